//! `GET /vm/config` in Firecracker's shape. Firecracker writes every field of its
//! configuration, `null` where nothing is set (and `[]` for empty lists, the MMDS address it
//! uses by default), and its clients and tests compare the document whole. Vessel's types leave
//! unset fields out (so that what a user wrote round-trips), so the export fills them in here,
//! in one place.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::types::DEFAULT_MMDS_ADDR;

/// The exported configuration (`FullVmConfiguration` in the document).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct ExportedVmConfig(pub Value);

/// Top-level sections: `null` when absent, lists `[]`.
const SECTIONS: &[(&str, bool)] = &[
    ("balloon", false),
    ("drives", true),
    ("boot-source", false),
    ("cpu-config", false),
    ("logger", false),
    ("machine-config", false),
    ("metrics", false),
    ("mmds-config", false),
    ("network-interfaces", true),
    ("vsock", false),
    ("entropy", false),
    ("pmem", true),
    ("memory-hotplug", false),
];

/// Fields each entry of a section has, `null` when unset (a missing `false` flag is
/// `false`).
const NULLS: &[(&str, &[&str])] = &[
    ("boot-source", &["initrd_path", "boot_args"]),
    (
        "drives",
        &[
            "partuuid",
            "is_read_only",
            "path_on_host",
            "rate_limiter",
            "socket",
        ],
    ),
    (
        "network-interfaces",
        &["guest_mac", "mtu", "rx_rate_limiter", "tx_rate_limiter"],
    ),
    ("pmem", &["rate_limiter"]),
    ("entropy", &["rate_limiter"]),
];
const FALSES: &[(&str, &[&str])] = &[
    ("balloon", &["free_page_reporting", "free_page_hinting"]),
    ("mmds-config", &["imds_compat"]),
    ("pmem", &["root_device", "read_only"]),
];

fn fill(obj: &mut Map<String, Value>, keys: &[&str], with: &Value) {
    for k in keys {
        obj.entry(k.to_string()).or_insert_with(|| with.clone());
    }
}

/// A rate limiter as Firecracker writes it: both buckets, each with `one_time_burst`.
fn limiter(v: &mut Value) {
    let Value::Object(l) = v else { return };
    fill(l, &["bandwidth", "ops"], &Value::Null);
    for b in ["bandwidth", "ops"] {
        if let Some(Value::Object(bucket)) = l.get_mut(b) {
            fill(bucket, &["one_time_burst"], &Value::Null);
        }
    }
}

fn entries(section: &mut Value) -> Vec<&mut Map<String, Value>> {
    match section {
        Value::Object(o) => vec![o],
        Value::Array(a) => a.iter_mut().filter_map(Value::as_object_mut).collect(),
        _ => Vec::new(),
    }
}

/// `config` (Vessel's serialization) in Firecracker's shape.
pub fn export(config: Value) -> ExportedVmConfig {
    let Value::Object(mut top) = config else {
        return ExportedVmConfig(config);
    };
    for (key, list) in SECTIONS {
        let empty = if *list {
            Value::Array(Vec::new())
        } else {
            Value::Null
        };
        top.entry(key.to_string()).or_insert(empty);
    }
    for (section, keys) in NULLS {
        if let Some(s) = top.get_mut(*section) {
            for e in entries(s) {
                fill(e, keys, &Value::Null);
                for k in ["rate_limiter", "rx_rate_limiter", "tx_rate_limiter"] {
                    if let Some(l) = e.get_mut(k) {
                        limiter(l);
                    }
                }
            }
        }
    }
    for (section, keys) in FALSES {
        if let Some(s) = top.get_mut(*section) {
            for e in entries(s) {
                fill(e, keys, &Value::Bool(false));
            }
        }
    }
    if let Some(Value::Object(m)) = top.get_mut("mmds-config") {
        m.entry("ipv4_address")
            .or_insert_with(|| Value::String(DEFAULT_MMDS_ADDR.to_string()));
    }
    ExportedVmConfig(Value::Object(top))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unset_fields_are_written_as_firecracker_writes_them() {
        let v = export(json!({
            "boot-source": {"kernel_image_path": "/k", "boot_args": ""},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false,
                "track_dirty_pages": false, "huge_pages": "None"},
            "drives": [{"drive_id": "rootfs", "is_root_device": true, "cache_type": "Unsafe",
                "is_read_only": true, "path_on_host": "/r", "io_engine": "Sync"}],
            "network-interfaces": [{"iface_id": "1", "host_dev_name": "tap1",
                "guest_mac": "06:00:00:00:00:01",
                "tx_rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 100}}}],
            "balloon": {"amount_mib": 1, "deflate_on_oom": true, "stats_polling_interval_s": 0},
            "mmds-config": {"version": "V1", "network_interfaces": ["1"]},
        }))
        .0;
        assert_eq!(
            v,
            json!({
                "boot-source": {"kernel_image_path": "/k", "boot_args": "", "initrd_path": null},
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false,
                    "track_dirty_pages": false, "huge_pages": "None"},
                "cpu-config": null,
                "drives": [{"drive_id": "rootfs", "partuuid": null, "is_root_device": true,
                    "cache_type": "Unsafe", "is_read_only": true, "path_on_host": "/r",
                    "rate_limiter": null, "io_engine": "Sync", "socket": null}],
                "network-interfaces": [{"iface_id": "1", "host_dev_name": "tap1",
                    "guest_mac": "06:00:00:00:00:01", "mtu": null, "rx_rate_limiter": null,
                    "tx_rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 100,
                        "one_time_burst": null}, "ops": null}}],
                "balloon": {"amount_mib": 1, "deflate_on_oom": true,
                    "stats_polling_interval_s": 0, "free_page_reporting": false,
                    "free_page_hinting": false},
                "mmds-config": {"version": "V1", "ipv4_address": "169.254.169.254",
                    "network_interfaces": ["1"], "imds_compat": false},
                "vsock": null,
                "entropy": null,
                "logger": null,
                "metrics": null,
                "pmem": [],
                "memory-hotplug": null,
            })
        );
    }
}
