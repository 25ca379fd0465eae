//! Firecracker's per-device metrics groups: `<kind>_<device id>` for each device and
//! `<kind>` for their sum (`block` for the drives, `pmem` for the pmem devices).

use serde_json::{Map, Value};
use vessel_virtio_devices::block::{BlockHandle, BlockStats};

/// Adds a group of `N` named counters per device, `<kind>_<id>`, and `<kind>` with their sums
/// (zeros without devices) to `out`. `names` are the counters' names in Firecracker's schema.
pub(super) fn device_groups<'a, const N: usize>(
    kind: &str,
    names: [&'static str; N],
    devices: impl Iterator<Item = (&'a str, [u64; N])>,
    out: &mut Map<String, Value>,
) {
    let mut total = [0u64; N];
    for (id, values) in devices {
        let mut group = Map::new();
        for (i, v) in values.into_iter().enumerate() {
            total[i] += v;
            group.insert(names[i].into(), v.into());
        }
        out.insert(format!("{kind}_{id}"), Value::Object(group));
    }
    let sums = names.iter().zip(total);
    out.insert(
        kind.into(),
        Value::Object(sums.map(|(n, v)| ((*n).to_string(), v.into())).collect()),
    );
}

/// Firecracker's names for the block counters Vessel keeps (the others of the group stay
/// zero).
const BLOCK: [&str; 4] = [
    "read_bytes",
    "write_bytes",
    "queue_event_count",
    "execute_fails",
];

fn block_values(s: &BlockStats) -> [u64; 4] {
    let s = s.snapshot();
    [s.bytes_read, s.bytes_written, s.wakeups, s.errors]
}

/// The drives' groups (cumulative counters): `block_<drive id>` and `block`.
pub(super) fn block_metrics(drives: &[(String, BlockHandle)], out: &mut Map<String, Value>) {
    let devices = drives
        .iter()
        .map(|(id, d)| (id.as_str(), block_values(d.stats())));
    device_groups("block", BLOCK, devices, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::atomic::Ordering;

    #[test]
    fn each_drive_has_its_group_and_block_is_their_sum() {
        let a = BlockStats::default();
        let b = BlockStats::default();
        a.bytes_read.store(512, Ordering::Relaxed);
        a.wakeups.store(3, Ordering::Relaxed);
        b.bytes_read.store(1024, Ordering::Relaxed);
        b.bytes_written.store(4096, Ordering::Relaxed);
        b.errors.store(1, Ordering::Relaxed);
        let mut m = Map::new();
        let drives = [("rootfs", block_values(&a)), ("scratch", block_values(&b))];
        device_groups("block", BLOCK, drives.into_iter(), &mut m);
        assert_eq!(
            Value::Object(m),
            json!({
                "block_rootfs": {"read_bytes": 512, "write_bytes": 0, "queue_event_count": 3, "execute_fails": 0},
                "block_scratch": {"read_bytes": 1024, "write_bytes": 4096, "queue_event_count": 0, "execute_fails": 1},
                "block": {"read_bytes": 1536, "write_bytes": 4096, "queue_event_count": 3, "execute_fails": 1},
            })
        );
        let mut none = Map::new();
        block_metrics(&[], &mut none);
        assert_eq!(none["block"]["read_bytes"], 0);
        assert_eq!(none.len(), 1);
    }
}
