//! The groups and fields of Firecracker's metrics line (v1.16), which tools and Firecracker's
//! own tests validate strictly: every group present, every field present, nothing else. A
//! line starts as this skeleton of zeros; what Vessel counts is filled into the fields of the
//! same name, and Vessel's own figures stay out of it (they are in `GET /vessel/metrics`).

use serde_json::{Map, Value};

/// A field: a number, or a latency aggregate (`min_us`, `max_us`, `sum_us`).
#[derive(Debug, Clone, Copy)]
enum Field {
    Num(&'static str),
    Agg(&'static str),
}

use Field::{Agg, Num};

const BLOCK: &[Field] = &[
    Num("activate_fails"),
    Num("cfg_fails"),
    Num("no_avail_buffer"),
    Num("event_fails"),
    Num("execute_fails"),
    Num("invalid_reqs_count"),
    Num("flush_count"),
    Num("queue_event_count"),
    Num("rate_limiter_event_count"),
    Num("update_count"),
    Num("update_fails"),
    Num("read_bytes"),
    Num("write_bytes"),
    Num("read_count"),
    Num("write_count"),
    Num("rate_limiter_throttled_events"),
    Num("io_engine_throttled_events"),
    Num("remaining_reqs_count"),
    Agg("read_agg"),
    Agg("write_agg"),
];

/// Firecracker's `pmem` group, also each device's `pmem_<id>`.
const PMEM: &[Field] = &[
    Num("activate_fails"),
    Num("cfg_fails"),
    Num("event_fails"),
    Num("queue_event_count"),
    Num("rate_limiter_throttled_events"),
    Num("rate_limiter_event_count"),
];

const NET: &[Field] = &[
    Num("activate_fails"),
    Num("cfg_fails"),
    Num("mac_address_updates"),
    Num("no_rx_avail_buffer"),
    Num("no_tx_avail_buffer"),
    Num("event_fails"),
    Num("rx_queue_event_count"),
    Num("rx_event_rate_limiter_count"),
    Num("rx_rate_limiter_throttled"),
    Num("rx_tap_event_count"),
    Num("rx_bytes_count"),
    Num("rx_packets_count"),
    Num("rx_fails"),
    Num("rx_count"),
    Num("tap_read_fails"),
    Num("tap_write_fails"),
    Num("tx_bytes_count"),
    Num("tx_malformed_frames"),
    Num("tx_fails"),
    Num("tx_count"),
    Num("tx_packets_count"),
    Num("tx_queue_event_count"),
    Num("tx_rate_limiter_event_count"),
    Num("tx_rate_limiter_throttled"),
    Num("tx_spoofed_mac_count"),
    Num("tx_remaining_reqs_count"),
    Agg("tap_write_agg"),
];

/// Firecracker's groups, in its order.
const GROUPS: &[(&str, &[Field])] = &[
    (
        "api_server",
        &[
            Num("process_startup_time_us"),
            Num("process_startup_time_cpu_us"),
        ],
    ),
    (
        "balloon",
        &[
            Num("activate_fails"),
            Num("inflate_count"),
            Num("stats_updates_count"),
            Num("stats_update_fails"),
            Num("deflate_count"),
            Num("event_fails"),
            Num("free_page_report_count"),
            Num("free_page_report_freed"),
            Num("free_page_report_fails"),
            Num("free_page_hint_count"),
            Num("free_page_hint_freed"),
            Num("free_page_hint_fails"),
        ],
    ),
    ("block", BLOCK),
    ("deprecated_api", &[Num("deprecated_http_api_calls")]),
    (
        "get_api_requests",
        &[
            Num("instance_info_count"),
            Num("machine_cfg_count"),
            Num("mmds_count"),
            Num("vmm_version_count"),
            Num("hotplug_memory_count"),
        ],
    ),
    (
        "i8042",
        &[
            Num("error_count"),
            Num("missed_read_count"),
            Num("missed_write_count"),
            Num("read_count"),
            Num("reset_count"),
            Num("write_count"),
        ],
    ),
    (
        "latencies_us",
        &[
            Num("full_create_snapshot"),
            Num("diff_create_snapshot"),
            Num("load_snapshot"),
            Num("pause_vm"),
            Num("resume_vm"),
            Num("vmm_full_create_snapshot"),
            Num("vmm_diff_create_snapshot"),
            Num("vmm_load_snapshot"),
            Num("vmm_pause_vm"),
            Num("vmm_resume_vm"),
        ],
    ),
    (
        "logger",
        &[
            Num("missed_metrics_count"),
            Num("metrics_fails"),
            Num("missed_log_count"),
            Num("rate_limited_log_count"),
        ],
    ),
    (
        "mmds",
        &[
            Num("rx_accepted"),
            Num("rx_accepted_err"),
            Num("rx_accepted_unusual"),
            Num("rx_bad_eth"),
            Num("rx_invalid_token"),
            Num("rx_no_token"),
            Num("rx_count"),
            Num("tx_bytes"),
            Num("tx_count"),
            Num("tx_errors"),
            Num("tx_frames"),
            Num("connections_created"),
            Num("connections_destroyed"),
        ],
    ),
    ("net", NET),
    (
        "patch_api_requests",
        &[
            Num("drive_count"),
            Num("drive_fails"),
            Num("network_count"),
            Num("network_fails"),
            Num("machine_cfg_count"),
            Num("machine_cfg_fails"),
            Num("mmds_count"),
            Num("mmds_fails"),
            Num("hotplug_memory_count"),
            Num("hotplug_memory_fails"),
            Num("pmem_count"),
            Num("pmem_fails"),
        ],
    ),
    (
        "put_api_requests",
        &[
            Num("actions_count"),
            Num("actions_fails"),
            Num("boot_source_count"),
            Num("boot_source_fails"),
            Num("drive_count"),
            Num("drive_fails"),
            Num("logger_count"),
            Num("logger_fails"),
            Num("machine_cfg_count"),
            Num("machine_cfg_fails"),
            Num("cpu_cfg_count"),
            Num("cpu_cfg_fails"),
            Num("metrics_count"),
            Num("metrics_fails"),
            Num("network_count"),
            Num("network_fails"),
            Num("mmds_count"),
            Num("mmds_fails"),
            Num("vsock_count"),
            Num("vsock_fails"),
            Num("pmem_count"),
            Num("pmem_fails"),
            Num("serial_count"),
            Num("serial_fails"),
            Num("hotplug_memory_count"),
            Num("hotplug_memory_fails"),
        ],
    ),
    ("seccomp", &[Num("num_faults")]),
    (
        "vcpu",
        &[
            Num("exit_io_in"),
            Num("exit_io_out"),
            Num("exit_mmio_read"),
            Num("exit_mmio_write"),
            Num("failures"),
            Num("kvmclock_ctrl_fails"),
            Agg("exit_io_in_agg"),
            Agg("exit_io_out_agg"),
            Agg("exit_mmio_read_agg"),
            Agg("exit_mmio_write_agg"),
        ],
    ),
    ("vmm", &[Num("panic_count")]),
    (
        "uart",
        &[
            Num("error_count"),
            Num("flush_count"),
            Num("missed_read_count"),
            Num("missed_write_count"),
            Num("read_count"),
            Num("write_count"),
            Num("rate_limiter_dropped_bytes"),
        ],
    ),
    (
        "signals",
        &[
            Num("sigbus"),
            Num("sigsegv"),
            Num("sigxfsz"),
            Num("sigxcpu"),
            Num("sigpipe"),
            Num("sighup"),
            Num("sigill"),
        ],
    ),
    (
        "vsock",
        &[
            Num("activate_fails"),
            Num("cfg_fails"),
            Num("rx_queue_event_fails"),
            Num("tx_queue_event_fails"),
            Num("ev_queue_event_fails"),
            Num("muxer_event_fails"),
            Num("conn_event_fails"),
            Num("rx_queue_event_count"),
            Num("tx_queue_event_count"),
            Num("rx_bytes_count"),
            Num("tx_bytes_count"),
            Num("rx_packets_count"),
            Num("tx_packets_count"),
            Num("conns_added"),
            Num("conns_killed"),
            Num("conns_removed"),
            Num("killq_resync"),
            Num("tx_flush_fails"),
            Num("tx_write_fails"),
            Num("rx_read_fails"),
        ],
    ),
    (
        "entropy",
        &[
            Num("activate_fails"),
            Num("entropy_event_fails"),
            Num("entropy_event_count"),
            Num("entropy_bytes"),
            Num("host_rng_fails"),
            Num("entropy_rate_limiter_throttled"),
            Num("rate_limiter_event_count"),
        ],
    ),
    ("interrupts", &[Num("triggers"), Num("config_updates")]),
    ("pmem", PMEM),
    (
        "memory_hotplug",
        &[
            Num("activate_fails"),
            Num("queue_event_fails"),
            Num("queue_event_count"),
            Num("plug_count"),
            Num("plug_bytes"),
            Num("plug_fails"),
            Agg("plug_agg"),
            Num("unplug_count"),
            Num("unplug_bytes"),
            Num("unplug_fails"),
            Num("unplug_discard_fails"),
            Agg("unplug_agg"),
            Num("state_count"),
            Num("state_fails"),
            Agg("state_agg"),
            Num("unplug_all_count"),
            Num("unplug_all_fails"),
            Agg("unplug_all_agg"),
        ],
    ),
];

fn zeros(fields: &[Field]) -> Map<String, Value> {
    fields
        .iter()
        .map(|f| match f {
            Num(n) => (n.to_string(), Value::from(0u64)),
            Agg(n) => (
                n.to_string(),
                serde_json::json!({"min_us": 0, "max_us": 0, "sum_us": 0}),
            ),
        })
        .collect()
}

/// Every group of Firecracker's schema with every field at zero.
pub fn skeleton() -> Map<String, Value> {
    GROUPS
        .iter()
        .map(|(g, fields)| (g.to_string(), Value::Object(zeros(fields))))
        .collect()
}

/// The fields of a per-device group (`block_<drive id>`, `net_<iface id>`), if `group` is one.
fn device_fields(group: &str) -> Option<&'static [Field]> {
    if group.starts_with("block_") {
        Some(BLOCK)
    } else if group.starts_with("net_") {
        Some(NET)
    } else if group.starts_with("pmem_") {
        Some(PMEM)
    } else {
        None
    }
}

/// Adds `value` to `group.field` of `line` if the schema has that field (a number; an
/// aggregate takes an object of `min_us`/`max_us`/`sum_us`). Per-device groups are created
/// on first use. Anything outside the schema is left out and reported as `false`.
pub fn fill(line: &mut Map<String, Value>, group: &str, field: &str, value: &Value) -> bool {
    if !line.contains_key(group) {
        match device_fields(group) {
            Some(fields) => {
                line.insert(group.to_string(), Value::Object(zeros(fields)));
            }
            None => return false,
        }
    }
    let Some(Value::Object(g)) = line.get_mut(group) else {
        return false;
    };
    match (g.get_mut(field), value) {
        (Some(Value::Number(_)), Value::Number(n)) => {
            g.insert(field.to_string(), Value::Number(n.clone()));
            true
        }
        (Some(Value::Object(agg)), Value::Object(v)) => {
            for (k, n) in v {
                if let (Some(slot), Value::Number(_)) = (agg.get_mut(k), n) {
                    *slot = n.clone();
                }
            }
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_skeleton_has_firecracker_s_groups_and_zeroed_fields() {
        let s = skeleton();
        assert_eq!(s.len(), GROUPS.len());
        assert_eq!(s["signals"]["sigxfsz"], 0);
        assert_eq!(
            s["vcpu"]["exit_io_in_agg"],
            json!({"min_us": 0, "max_us": 0, "sum_us": 0})
        );
        assert_eq!(s["put_api_requests"].as_object().unwrap().len(), 26);
        assert!(s["get_api_requests"].get("balloon_count").is_none());
    }

    #[test]
    fn only_schema_fields_are_filled() {
        let mut s = skeleton();
        assert!(fill(&mut s, "vcpu", "exit_io_in", &json!(7)));
        assert_eq!(s["vcpu"]["exit_io_in"], 7);
        assert!(!fill(&mut s, "vcpu", "made_up", &json!(1)));
        assert!(!fill(&mut s, "vessel_vm", "uptime_ms", &json!(1)));
        assert!(s["vcpu"].get("made_up").is_none() && s.get("vessel_vm").is_none());
        // An aggregate takes its three numbers; a number does not replace it.
        assert!(fill(
            &mut s,
            "block",
            "read_agg",
            &json!({"min_us": 1, "max_us": 9, "sum_us": 20, "other": 3})
        ));
        assert_eq!(
            s["block"]["read_agg"],
            json!({"min_us": 1, "max_us": 9, "sum_us": 20})
        );
        assert!(!fill(&mut s, "block", "read_agg", &json!(5)));
        // Per-device groups are Firecracker's too.
        assert!(fill(&mut s, "block_rootfs", "read_count", &json!(3)));
        assert_eq!(s["block_rootfs"]["read_count"], 3);
        assert_eq!(s["block_rootfs"]["write_count"], 0);
        assert!(fill(&mut s, "pmem_data", "queue_event_count", &json!(2)));
        assert_eq!(s["pmem_data"]["queue_event_count"], 2);
        assert_eq!(s["pmem_data"]["cfg_fails"], 0);
        assert!(!fill(&mut s, "pmem_data", "flushes", &json!(1)));
    }
}
