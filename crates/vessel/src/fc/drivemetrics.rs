//! The drives' counters as Firecracker's metrics groups: one `block_<drive id>` group per
//! virtio-block drive and `block`, their sum.

use std::sync::Arc;

use serde_json::{Map, Value};
use vessel_virtio_devices::block::BlockStats;

/// Firecracker's name for each counter Vessel keeps (the others of its group stay zero).
fn values(s: &BlockStats) -> [(&'static str, u64); 4] {
    let s = s.snapshot();
    [
        ("read_bytes", s.bytes_read),
        ("write_bytes", s.bytes_written),
        ("queue_event_count", s.wakeups),
        ("execute_fails", s.errors),
    ]
}

/// Adds the drives' groups (cumulative counters) to `out`; `block` is there even without
/// a drive.
pub(super) fn block_metrics(drives: &[(String, Arc<BlockStats>)], out: &mut Map<String, Value>) {
    let mut total = [0u64; 4];
    for (id, stats) in drives {
        let mut group = Map::new();
        for (i, (name, v)) in values(stats).into_iter().enumerate() {
            total[i] += v;
            group.insert(name.into(), v.into());
        }
        out.insert(format!("block_{id}"), Value::Object(group));
    }
    let names = values(&BlockStats::default()).map(|(n, _)| n);
    out.insert(
        "block".into(),
        Value::Object(
            names
                .iter()
                .zip(total)
                .map(|(n, v)| ((*n).to_string(), v.into()))
                .collect(),
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::atomic::Ordering;

    #[test]
    fn each_drive_has_its_group_and_block_is_their_sum() {
        let a = Arc::new(BlockStats::default());
        let b = Arc::new(BlockStats::default());
        a.bytes_read.store(512, Ordering::Relaxed);
        a.wakeups.store(3, Ordering::Relaxed);
        b.bytes_read.store(1024, Ordering::Relaxed);
        b.bytes_written.store(4096, Ordering::Relaxed);
        b.errors.store(1, Ordering::Relaxed);
        let mut m = Map::new();
        block_metrics(&[("rootfs".into(), a), ("scratch".into(), b)], &mut m);
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
