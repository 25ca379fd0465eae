//! virtio-pmem in the Firecracker-compatible backend: the API's devices as the VMM's
//! [`PmemConfig`]s, `PATCH /pmem/{id}` on a running device's rate limiter, and the `pmem`
//! metrics group (Firecracker's: `pmem_<id>` per device and `pmem`, their sum, as counts since
//! the previous line).

use std::path::PathBuf;

use serde_json::{Map, Value};
use vessel_api::types::{PartialPmem, Pmem};
use vessel_api::{ApiError, VmResources};
use vessel_virtio_devices::pmem::{PmemHandle, PmemStats};
use vessel_vmm::device_config::{PmemConfig, Transport};

use super::config::{limiter_config, update_limiter};

/// The API's pmem devices, in order (`/dev/pmem0` first), on `transport`.
pub(super) fn configs(r: &VmResources, transport: Transport) -> Vec<PmemConfig> {
    r.pmem.iter().map(|p| config(p, transport)).collect()
}

/// One API pmem device, on `transport`.
pub(super) fn config(p: &Pmem, transport: Transport) -> PmemConfig {
    PmemConfig {
        path: PathBuf::from(&p.path_on_host),
        read_only: p.read_only,
        root: p.root_device,
        transport,
        rate_limiter: limiter_config(&p.rate_limiter),
        guest_addr: None,
    }
}

/// The running VM's pmem devices by id.
#[derive(Debug, Default)]
pub(super) struct PmemDevices {
    devices: Vec<(String, PmemHandle)>,
}

impl PmemDevices {
    /// The devices of a VM started from `r` (the VMM built them in the same order).
    pub(super) fn new(r: &VmResources, handles: &[PmemHandle]) -> PmemDevices {
        PmemDevices {
            devices: r
                .pmem
                .iter()
                .map(|p| p.id.clone())
                .zip(handles.iter().cloned())
                .collect(),
        }
    }

    /// A hot-plugged device.
    pub(super) fn push(&mut self, id: String, handle: PmemHandle) {
        self.devices.push((id, handle));
    }

    /// Device `id`'s handle.
    pub(super) fn handle(&self, id: &str) -> Option<&PmemHandle> {
        self.devices.iter().find(|(d, _)| d == id).map(|(_, h)| h)
    }

    /// Forgets an unplugged device.
    pub(super) fn remove(&mut self, id: &str) {
        self.devices.retain(|(d, _)| d != id);
    }

    /// Sets each device's rate limiter to what `r` says (a restored VM: its devices were
    /// rebuilt with the limits they booted with; the API's resources have the latest).
    pub(super) fn set_limiters(&self, r: &VmResources) {
        for ((_, dev), p) in self.devices.iter().zip(&r.pmem) {
            dev.limiter
                .set_config(&limiter_config(&p.rate_limiter).unwrap_or_default());
        }
    }

    /// `PATCH /pmem/{id}`: the device's rate limiter (buckets left out stay).
    pub(super) fn update(&self, u: &PartialPmem) -> Result<(), ApiError> {
        let Some((_, dev)) = self.devices.iter().find(|(id, _)| *id == u.id) else {
            return Err(ApiError::bad(format!(
                "Pmem config error: Unable to patch the pmem device: Failed perform action on device: Device not found Please verify the request arguments. ({})",
                u.id
            )));
        };
        update_limiter(&dev.limiter, &u.rate_limiter);
        log::info!("pmem {}: rate limiter now {:?}", u.id, dev.limiter.config());
        Ok(())
    }

    /// Firecracker's `pmem` groups: `pmem_<id>` for each device and `pmem` for all, each
    /// counter's total (zeros without devices; metrics lines report what changed since the
    /// previous one).
    pub(super) fn metrics(&self, out: &mut Map<String, Value>) {
        let names = PmemStats::default().values().map(|(n, _)| n);
        let devices = self
            .devices
            .iter()
            .map(|(id, dev)| (id.as_str(), dev.stats.values().map(|(_, v)| v)));
        super::devmetrics::device_groups("pmem", names, devices, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::atomic::Ordering;
    use vessel_ratelimit::{BucketConfig, RateLimiter};

    fn resources(ids: &[&str]) -> VmResources {
        let f = std::env::temp_dir().join(format!("vessel-fc-pmem-{}", std::process::id()));
        std::fs::write(&f, b"x").unwrap();
        let mut r = VmResources::default();
        for (i, id) in ids.iter().enumerate() {
            r.set_pmem(
                serde_json::from_value(json!({
                    "id": id, "path_on_host": f, "root_device": i == 0, "read_only": i == 0,
                    "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}
                }))
                .unwrap(),
            )
            .unwrap();
        }
        r
    }

    fn handle() -> PmemHandle {
        PmemHandle {
            limiter: RateLimiter::unlimited().unwrap(),
            stats: Default::default(),
        }
    }

    #[test]
    fn api_devices_map_in_order_and_patches_reach_the_limiter() {
        let r = resources(&["root", "data"]);
        let c = configs(&r, Transport::Pci);
        assert_eq!(c.len(), 2);
        assert!(c[0].root && c[0].read_only && !c[1].root);
        assert_eq!(c[1].transport, Transport::Pci);
        assert_eq!(c[0].rate_limiter, None, "a limiter that limits nothing");
        let (a, b) = (handle(), handle());
        let devs = PmemDevices::new(&r, &[a.clone(), b.clone()]);
        let u: PartialPmem = serde_json::from_value(
            json!({"id": "data", "rate_limiter": {"ops": {"size": 3, "refill_time": 30}}}),
        )
        .unwrap();
        devs.update(&u).unwrap();
        assert_eq!(
            b.limiter.config().ops,
            Some(BucketConfig {
                size: 3,
                one_time_burst: 0,
                refill_time_ms: 30
            })
        );
        assert!(!a.limiter.is_limited());
        let e = devs
            .update(&serde_json::from_value(json!({"id": "x"})).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("Device not found"), "{e}");
        // A restore puts the resources' limits (the latest) back on the rebuilt devices.
        let mut r = r;
        r.apply_pmem_update(&u);
        let (c, d) = (handle(), handle());
        let restored = PmemDevices::new(&r, &[c.clone(), d.clone()]);
        d.limiter.set_config(&Default::default());
        restored.set_limiters(&r);
        assert_eq!(d.limiter.config(), b.limiter.config());
        assert!(!c.limiter.is_limited());
    }

    #[test]
    fn metrics_are_per_device_and_summed() {
        let none = PmemDevices::default();
        let mut m = Map::new();
        none.metrics(&mut m);
        assert_eq!(
            Value::Object(m),
            json!({"pmem": {"activate_fails": 0, "cfg_fails": 0, "event_fails": 0,
                "queue_event_count": 0, "rate_limiter_throttled_events": 0,
                "rate_limiter_event_count": 0}})
        );
        let r = resources(&["a", "b"]);
        let (a, b) = (handle(), handle());
        let devs = PmemDevices::new(&r, &[a.clone(), b.clone()]);
        let bump = |s: &PmemStats, n| s.queue_event_count.fetch_add(n, Ordering::Relaxed);
        bump(&a.stats, 2);
        bump(&b.stats, 3);
        let mut m = Map::new();
        devs.metrics(&mut m);
        assert_eq!(m["pmem_a"]["queue_event_count"], 2);
        assert_eq!(m["pmem_b"]["queue_event_count"], 3);
        assert_eq!(m["pmem"]["queue_event_count"], 5);
        bump(&a.stats, 1);
        let mut m = Map::new();
        devs.metrics(&mut m);
        assert_eq!(m["pmem_a"]["queue_event_count"], 3);
        assert_eq!(m["pmem"]["queue_event_count"], 6);
    }
}
