//! End-to-end tests of the API over a real Unix socket, with a mock VMM backend. Every
//! response is checked against `openapi.json`, and so is every request meant to be valid.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use vessel_api::client::{Client, ClientResponse};
use vessel_api::http::Limits;
use vessel_api::types::*;
use vessel_api::{
    openapi, routes, ApiController, ApiError, ApiServer, ServerConfig, VmResources, VmmBackend,
};

const T: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Mock {
    calls: Arc<Mutex<Vec<String>>>,
}

impl Mock {
    fn log(&self, s: &str) {
        self.calls.lock().unwrap().push(s.to_string());
    }

    fn plug(&self, what: &str, id: &str) -> Result<(), ApiError> {
        if id.starts_with("refused") {
            return Err(ApiError::bad(format!("{what}: the VMM refused {id}")));
        }
        self.log(&format!("{what} {id}"));
        Ok(())
    }
}

impl VmmBackend for Mock {
    fn validate(&mut self, r: &VmResources) -> Result<(), ApiError> {
        if r.machine_config.huge_pages != HugePages::None {
            return Err(ApiError::Unsupported("huge pages".into()));
        }
        // The VMM checks the user-data (here: a stand-in for its header check).
        if r.cloud_init
            .as_ref()
            .is_some_and(|c| !c.user_data.starts_with('#'))
        {
            return Err(ApiError::bad(
                "Cloud-init seed error: unrecognised user-data",
            ));
        }
        Ok(())
    }
    fn start(&mut self, _: &VmResources) -> Result<(), ApiError> {
        self.log("start");
        Ok(())
    }
    fn configure_serial(&mut self, s: &SerialDevice) -> Result<(), ApiError> {
        self.log(&format!(
            "serial {}",
            s.serial_out_path.as_deref().unwrap_or("-")
        ));
        Ok(())
    }
    fn pause(&mut self) -> Result<(), ApiError> {
        self.log("pause");
        Ok(())
    }
    fn resume(&mut self) -> Result<(), ApiError> {
        self.log("resume");
        Ok(())
    }
    fn send_ctrl_alt_del(&mut self) -> Result<(), ApiError> {
        self.log("ctrl_alt_del");
        Ok(())
    }
    fn stop(&mut self) -> Result<(), ApiError> {
        self.log("stop");
        Ok(())
    }
    fn metrics(&mut self) -> Result<serde_json::Map<String, Value>, ApiError> {
        let mut m = serde_json::Map::new();
        m.insert("vcpu".into(), json!({"exit_io_in": 7}));
        Ok(m)
    }
    fn update_drive(&mut self, u: &PartialDrive) -> Result<(), ApiError> {
        self.log(&format!("update_drive {}", u.drive_id));
        Ok(())
    }
    fn update_pmem(&mut self, u: &PartialPmem) -> Result<(), ApiError> {
        self.log(&format!("update_pmem {}", u.id));
        Ok(())
    }
    // Hot-plugs fail for ids starting with `refused`, hot-unplugs for ids starting with `busy`.
    fn hotplug_drive(&mut self, d: &Drive) -> Result<(), ApiError> {
        self.plug("hotplug_drive", &d.drive_id)
    }
    fn hotplug_network_interface(&mut self, n: &NetworkInterface) -> Result<(), ApiError> {
        self.plug("hotplug_network_interface", &n.iface_id)
    }
    fn hotplug_pmem(&mut self, p: &Pmem) -> Result<(), ApiError> {
        self.plug("hotplug_pmem", &p.id)
    }
    fn unplug(&mut self, d: &PluggedDevice) -> Result<(), ApiError> {
        if d.id().starts_with("busy") {
            return Err(ApiError::Internal(format!("{} is still in use", d.id())));
        }
        self.log(&format!("unplug {d:?}"));
        Ok(())
    }
    fn balloon_config(&mut self) -> Result<Balloon, ApiError> {
        Ok(Balloon {
            amount_mib: 16,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            free_page_hinting: false,
            free_page_reporting: false,
        })
    }
    fn balloon_update(&mut self, mib: u32) -> Result<(), ApiError> {
        self.log(&format!("balloon {mib}"));
        Ok(())
    }
    fn balloon_stats_interval(&mut self, _: u16) -> Result<(), ApiError> {
        Ok(())
    }
    fn balloon_stats(&mut self) -> Result<BalloonStats, ApiError> {
        Ok(BalloonStats {
            target_pages: 4096,
            actual_pages: 4096,
            target_mib: 16,
            actual_mib: 16,
            free_memory: Some(1 << 20),
            ..Default::default()
        })
    }
    fn balloon_hinting_start(&mut self, cmd: BalloonStartCmd) -> Result<(), ApiError> {
        self.log(&format!("hinting start ack={}", cmd.acknowledge_on_stop));
        Ok(())
    }
    fn balloon_hinting_status(&mut self) -> Result<BalloonHintingStatus, ApiError> {
        Ok(BalloonHintingStatus {
            host_cmd: 1,
            guest_cmd: Some(0),
        })
    }
    fn balloon_hinting_stop(&mut self) -> Result<(), ApiError> {
        self.log("hinting stop");
        Ok(())
    }
    fn snapshot_create(&mut self, p: &SnapshotCreateParams) -> Result<(), ApiError> {
        self.log(&format!("snapshot {}", p.snapshot_path));
        Ok(())
    }
    fn memory_hotplug_status(&mut self) -> Result<MemoryHotplugStatus, ApiError> {
        Ok(MemoryHotplugStatus {
            total_size_mib: 1024,
            block_size_mib: 2,
            slot_size_mib: 128,
            plugged_size_mib: 256,
            requested_size_mib: 512,
        })
    }
    fn memory_hotplug_update(&mut self, mib: u64) -> Result<(), ApiError> {
        self.log(&format!("memory {mib}"));
        Ok(())
    }
}

static N: AtomicUsize = AtomicUsize::new(0);

struct Env {
    dir: PathBuf,
    sock: PathBuf,
    server: Option<ApiServer>,
    calls: Arc<Mutex<Vec<String>>>,
}

impl Env {
    fn new() -> Env {
        Self::with_config(ServerConfig::default())
    }

    fn with_config(cfg: ServerConfig) -> Env {
        let dir = std::env::temp_dir().join(format!(
            "vessel-api-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["vmlinux", "initrd", "rootfs.ext4", "data.img"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let mock = Mock::default();
        let calls = mock.calls.clone();
        let ctl = ApiController::new(Box::new(mock), "vm0", "1.7.0");
        let sock = dir.join("api.sock");
        let server = ApiServer::start(&sock, Arc::new(Mutex::new(ctl)), cfg).unwrap();
        Env {
            dir,
            sock,
            server: Some(server),
            calls,
        }
    }

    fn p(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }

    fn client(&self) -> Client {
        Client::new(&self.sock, T)
    }

    /// Sends a request, validates request and response against the document.
    fn call(
        &self,
        c: &mut Client,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> ClientResponse {
        let text = body.as_ref().map(|b| b.to_string());
        let r = c.request(method, path, text.as_deref()).unwrap();
        check_response(method, path, &r);
        r
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The documented path pattern of a concrete path.
fn pattern(method: &str, path: &str) -> Option<&'static str> {
    let m = match method {
        "GET" => vessel_api::http::Method::Get,
        "PUT" => vessel_api::http::Method::Put,
        "PATCH" => vessel_api::http::Method::Patch,
        "DELETE" => vessel_api::http::Method::Delete,
        _ => return None,
    };
    routes::find(&m, path).map(|(i, _)| routes::table()[i].path)
}

fn check_response(method: &str, path: &str, r: &ClientResponse) {
    let Some(pat) = pattern(method, path) else {
        assert_eq!(r.status, 400);
        assert!(r.json().get("fault_message").is_some());
        return;
    };
    let m = method.to_ascii_lowercase();
    let schema =
        openapi::response_schema(pat, &m, r.status).unwrap_or_else(|e| panic!("{e}: {}", r.text()));
    match schema {
        None => assert!(r.body.is_empty(), "{method} {path}: {}", r.text()),
        Some(s) if s.get("type").and_then(Value::as_str) == Some("string") => {}
        Some(s) => {
            let v: Value = serde_json::from_slice(&r.body)
                .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", r.text()));
            openapi::validate(s, &v)
                .unwrap_or_else(|e| panic!("{method} {path} {}: {e}: {v}", r.status));
        }
    }
}

fn check_request(method: &str, pat: &str, body: &Value) {
    let s = openapi::request_schema(pat, &method.to_ascii_lowercase())
        .unwrap_or_else(|| panic!("{method} {pat} has no body schema"));
    openapi::validate(s, body).unwrap_or_else(|e| panic!("{method} {pat}: {e}"));
}

#[test]
fn table_and_document_agree() {
    let doc = openapi::document();
    let paths = doc["paths"].as_object().expect("paths");
    let mut documented = Vec::new();
    for (p, ops) in paths {
        for m in ops.as_object().unwrap().keys() {
            documented.push((m.to_ascii_uppercase(), p.clone()));
        }
    }
    for r in routes::table() {
        let key = (r.method.as_str().to_string(), r.path.to_string());
        assert!(
            documented.contains(&key),
            "{key:?} served but not documented"
        );
        let op = openapi::operation(r.path, &r.method.as_str().to_ascii_lowercase()).unwrap();
        assert_eq!(op["operationId"], r.operation_id, "{key:?}");
        let req = openapi::request_schema(r.path, &r.method.as_str().to_ascii_lowercase());
        assert_eq!(
            req.and_then(openapi::ref_name),
            r.request,
            "request schema of {key:?}"
        );
        let ok = openapi::response_schema(r.path, &r.method.as_str().to_ascii_lowercase(), 200);
        match r.response {
            Some("text/plain") => assert_eq!(ok.unwrap().unwrap()["type"], "string"),
            Some(name) => assert_eq!(
                ok.unwrap().and_then(openapi::ref_name),
                Some(name),
                "{key:?}"
            ),
            None => assert!(openapi::response_schema(
                r.path,
                &r.method.as_str().to_ascii_lowercase(),
                204
            )
            .unwrap()
            .is_none()),
        }
    }
    for (m, p) in &documented {
        assert!(
            routes::table()
                .iter()
                .any(|r| r.method.as_str() == m && r.path == p),
            "{m} {p} documented but not served"
        );
    }
    // Every definition the Rust types name exists.
    for r in routes::table() {
        for name in r
            .request
            .iter()
            .chain(r.response.iter())
            .filter(|n| !n.contains('/'))
        {
            assert!(
                doc["definitions"].get(*name).is_some(),
                "definition {name} missing"
            );
        }
    }
}

#[test]
fn every_endpoint_before_and_after_start() {
    let env = Env::new();
    let mut c = env.client();
    let vmlinux = env.p("vmlinux");
    let rootfs = env.p("rootfs.ext4");
    let metrics_path = env.p("metrics.json");
    // (method, path, body, status before start, status after start)
    let cases: Vec<(&str, &str, Option<Value>, u16, u16)> = vec![
        ("GET", "/", None, 200, 200),
        ("GET", "/version", None, 200, 200),
        (
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 2, "mem_size_mib": 256})),
            204,
            400,
        ),
        (
            "PATCH",
            "/machine-config",
            Some(json!({"mem_size_mib": 512})),
            204,
            400,
        ),
        ("GET", "/machine-config", None, 200, 200),
        (
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": vmlinux, "boot_args": "console=ttyS0"})),
            204,
            400,
        ),
        (
            "PUT",
            "/drives/rootfs",
            Some(
                json!({"drive_id": "rootfs", "path_on_host": rootfs, "is_root_device": true, "is_read_only": false}),
            ),
            204,
            400,
        ),
        (
            "PATCH",
            "/drives/rootfs",
            Some(json!({"drive_id": "rootfs", "path_on_host": rootfs})),
            400,
            204,
        ),
        (
            "PUT",
            "/pmem/data",
            Some(json!({"id": "data", "path_on_host": env.p("data.img"), "read_only": true})),
            204,
            400,
        ),
        (
            "PATCH",
            "/pmem/data",
            Some(json!({"id": "data", "rate_limiter": {"ops": {"size": 10, "refill_time": 1000}}})),
            400,
            204,
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            Some(
                json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}),
            ),
            204,
            400,
        ),
        (
            "PATCH",
            "/network-interfaces/eth0",
            Some(
                json!({"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}),
            ),
            400,
            400,
        ),
        // Hot-unplug: refused before start; after, the root device and unknown ids.
        ("DELETE", "/drives/rootfs", None, 400, 400),
        ("DELETE", "/pmem/nope", None, 400, 400),
        ("DELETE", "/network-interfaces/nope", None, 400, 400),
        (
            "PUT",
            "/vsock",
            Some(json!({"guest_cid": 3, "uds_path": "/tmp/v.sock"})),
            204,
            400,
        ),
        ("PUT", "/entropy", Some(json!({})), 204, 400),
        (
            "PUT",
            "/balloon",
            Some(json!({"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 1})),
            204,
            400,
        ),
        ("GET", "/balloon", None, 200, 200),
        (
            "PATCH",
            "/balloon",
            Some(json!({"amount_mib": 32})),
            400,
            204,
        ),
        ("GET", "/balloon/statistics", None, 400, 200),
        // Free page hinting: the start's body may be left out (acknowledge_on_stop: true).
        ("PATCH", "/balloon/hinting/start", None, 400, 204),
        (
            "PATCH",
            "/balloon/hinting/start",
            Some(json!({"acknowledge_on_stop": false})),
            400,
            204,
        ),
        ("GET", "/balloon/hinting/status", None, 400, 200),
        ("PATCH", "/balloon/hinting/stop", None, 400, 204),
        (
            "PATCH",
            "/balloon/statistics",
            Some(json!({"stats_polling_interval_s": 5})),
            400,
            204,
        ),
        (
            "PUT",
            "/mmds/config",
            Some(json!({"network_interfaces": ["eth0"], "version": "V2"})),
            204,
            400,
        ),
        (
            "PUT",
            "/mmds",
            Some(json!({"latest": {"meta-data": {"ami-id": "ami-1"}}})),
            204,
            204,
        ),
        (
            "PATCH",
            "/mmds",
            Some(json!({"latest": {"meta-data": {"hostname": "vm0"}}})),
            204,
            204,
        ),
        ("GET", "/mmds", None, 200, 200),
        (
            "PUT",
            "/cpu-config",
            Some(
                json!({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [{"register": "ecx", "bitmap": "0bxxxx"}]}]}),
            ),
            204,
            400,
        ),
        (
            "PUT",
            "/logger",
            Some(json!({"level": "Info", "show_level": true})),
            204,
            400,
        ),
        (
            "PUT",
            "/metrics",
            Some(json!({"metrics_path": metrics_path})),
            204,
            400,
        ),
        (
            "PUT",
            "/serial",
            Some(json!({"serial_out_path": "/tmp/serial.log"})),
            204,
            400,
        ),
        (
            "PUT",
            "/hotplug/memory",
            Some(json!({"total_size_mib": 1024})),
            204,
            400,
        ),
        ("GET", "/hotplug/memory", None, 400, 200),
        (
            "PATCH",
            "/hotplug/memory",
            Some(json!({"requested_size_mib": 512})),
            400,
            204,
        ),
        ("GET", "/vm/config", None, 200, 200),
        ("PATCH", "/vm", Some(json!({"state": "Paused"})), 400, 204),
        (
            "PUT",
            "/snapshot/create",
            Some(json!({"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"})),
            400,
            204,
        ),
        ("PATCH", "/vm", Some(json!({"state": "Resumed"})), 400, 204),
        (
            "PUT",
            "/actions",
            Some(json!({"action_type": "SendCtrlAltDel"})),
            400,
            204,
        ),
        (
            "PUT",
            "/actions",
            Some(json!({"action_type": "FlushMetrics"})),
            400,
            204,
        ),
        (
            "PUT",
            "/snapshot/load",
            Some(json!({
                "snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m",
                "vsock_override": {"uds_path": "/tmp/v.sock", "guest_cid": 7}
            })),
            400,
            400,
        ),
        (
            "PUT",
            "/vessel/cloud-init",
            Some(json!({"user_data": "#cloud-config\n", "meta_data": "instance-id: i-1\n"})),
            204,
            400,
        ),
        (
            "PUT",
            "/vessel/fs/share",
            Some(json!({"id": "share", "tag": "share", "shared_dir": env.dir, "read_only": true})),
            204,
            400,
        ),
        ("GET", "/vessel/metrics", None, 200, 200),
        ("PUT", "/vessel/stop", None, 400, 204),
        (
            "PUT",
            "/vessel/migrate",
            Some(json!({"destination": "unix:/nonexistent/m.sock"})),
            400,
            400,
        ),
    ];
    // Every route of the table is exercised.
    for r in routes::table() {
        assert!(
            cases
                .iter()
                .any(|(m, p, ..)| *m == r.method.as_str() && pattern(m, p) == Some(r.path)),
            "{r:?} not exercised"
        );
    }
    for phase in 0..2 {
        for (m, p, body, pre, post) in &cases {
            if let Some(b) = body {
                check_request(m, pattern(m, p).unwrap(), b);
            }
            let r = env.call(&mut c, m, p, body.clone());
            let want = if phase == 0 { *pre } else { *post };
            assert_eq!(r.status, want, "phase {phase}: {m} {p}: {}", r.text());
            if r.status == 400 {
                assert!(!r.json()["fault_message"].as_str().unwrap_or("").is_empty());
            }
        }
        if phase == 0 {
            // The snapshot/load refusal pre-boot is about the configured resources.
            let r = env.call(
                &mut c,
                "PUT",
                "/actions",
                Some(json!({"action_type": "InstanceStart"})),
            );
            assert_eq!(r.status, 204, "{}", r.text());
        }
    }
    // A snapshot of a running VM is refused in Firecracker's words.
    let r = env.call(
        &mut c,
        "PUT",
        "/snapshot/create",
        Some(json!({"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"})),
    );
    assert!(
        r.json()["fault_message"]
            .as_str()
            .unwrap_or("")
            .contains("save/restore unavailable while running"),
        "{}",
        r.text()
    );
    let r = env.call(&mut c, "GET", "/", None);
    assert_eq!(
        r.json(),
        json!({"id": "vm0", "state": "Running", "vmm_version": vessel_api::FIRECRACKER_API_VERSION, "app_name": "Firecracker"})
    );
    let r = env.call(&mut c, "GET", "/version", None);
    assert_eq!(
        r.json(),
        json!({"firecracker_version": vessel_api::FIRECRACKER_API_VERSION})
    );
    let r = env.call(
        &mut c,
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": vmlinux})),
    );
    assert_eq!(
        r.json()["fault_message"],
        "The requested operation is not supported after starting the microVM."
    );
    let cfg = env.call(&mut c, "GET", "/vm/config", None).json();
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 512);
    assert_eq!(cfg["drives"][0]["drive_id"], "rootfs");
    assert_eq!(
        cfg["pmem"],
        json!([{"id": "data", "path_on_host": env.p("data.img"), "root_device": false,
                "read_only": true, "rate_limiter": {"bandwidth": null,
                "ops": {"size": 10, "one_time_burst": null, "refill_time": 1000}}}])
    );
    assert_eq!(cfg["balloon"]["amount_mib"], 32);
    assert_eq!(
        cfg["memory-hotplug"],
        json!({"total_size_mib": 1024, "block_size_mib": 2, "slot_size_mib": 128})
    );
    assert_eq!(
        env.call(&mut c, "GET", "/hotplug/memory", None).json(),
        json!({"total_size_mib": 1024, "block_size_mib": 2, "slot_size_mib": 128,
               "plugged_size_mib": 256, "requested_size_mib": 512})
    );
    assert_eq!(
        cfg["vessel-cloud-init"],
        json!({"user_data": "#cloud-config\n", "meta_data": "instance-id: i-1\n"})
    );
    assert_eq!(
        cfg["vessel-fs"],
        json!([{"id": "share", "tag": "share", "shared_dir": env.dir, "read_only": true}])
    );
    assert_eq!(
        env.call(&mut c, "GET", "/mmds", None).json(),
        json!({"latest": {"meta-data": {"ami-id": "ami-1", "hostname": "vm0"}}})
    );
    assert_eq!(
        env.call(&mut c, "GET", "/balloon/hinting/status", None)
            .json(),
        json!({"host_cmd": 1, "guest_cmd": 0})
    );
    let calls = env.calls.lock().unwrap().clone();
    for want in [
        "start",
        "pause",
        "snapshot /tmp/s",
        "resume",
        "ctrl_alt_del",
        "update_drive rootfs",
        "update_pmem data",
        "balloon 32",
        "serial /tmp/serial.log",
        "memory 512",
        "hinting start ack=true",
        "hinting start ack=false",
        "hinting stop",
    ] {
        assert!(
            calls.iter().any(|c| c == want),
            "{want} not called: {calls:?}"
        );
    }
    // InstanceStart wrote a first Firecracker-style line, FlushMetrics the next, each with
    // the counts since the one before.
    let lines = std::fs::read_to_string(&metrics_path).unwrap();
    let lines: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["put_api_requests"]["boot_source_count"], 1);
    assert_eq!(lines[0]["put_api_requests"]["boot_source_fails"], 0);
    assert_eq!(lines[1]["put_api_requests"]["boot_source_count"], 1);
    assert_eq!(lines[1]["put_api_requests"]["boot_source_fails"], 1);
    // The VMM's counters: its total in the first line, nothing new in the second; the
    // Prometheus endpoint has the total.
    assert_eq!(lines[0]["vcpu"]["exit_io_in"], 7);
    assert_eq!(lines[1]["vcpu"]["exit_io_in"], 0);
    let prom = env.call(&mut c, "GET", "/vessel/metrics", None).text();
    assert!(
        prom.contains("vessel_api_requests_total{method=\"PUT\",path=\"/boot-source\"} 3"),
        "{prom}"
    );
    assert!(prom.contains("vessel_vcpu_exit_io_in 7"));
}

#[test]
fn bad_bodies_get_firecracker_errors() {
    let env = Env::new();
    let mut c = env.client();
    let rootfs = env.p("rootfs.ext4");
    let mismatch = format!("{{\"drive_id\": \"y\", \"path_on_host\": \"{rootfs}\", \"is_root_device\": false, \"is_read_only\": true}}");
    let fs_both =
        json!({"id": "x", "tag": "x", "shared_dir": env.dir, "socket": env.sock}).to_string();
    let fs_long_tag = json!({"id": "x", "tag": "t".repeat(37), "shared_dir": env.dir}).to_string();
    let cases: Vec<(&str, &str, Option<&str>, &str)> = vec![
        (
            "PUT",
            "/machine-config",
            Some("{\"vcpu_count\": 2"),
            "An error occurred when deserializing the json body of a request: EOF",
        ),
        (
            "PUT",
            "/machine-config",
            Some("{\"vcpu_count\": 2, \"mem_size_mib\": 64, \"foo\": 1}"),
            "unknown field `foo`",
        ),
        (
            "PUT",
            "/machine-config",
            Some("{\"vcpu_count\": \"2\", \"mem_size_mib\": 64}"),
            "invalid type",
        ),
        (
            "PUT",
            "/machine-config",
            Some("{\"vcpu_count\": 33, \"mem_size_mib\": 64}"),
            "The number of vCPUs",
        ),
        (
            "PUT",
            "/machine-config",
            Some("{\"vcpu_count\": 3, \"mem_size_mib\": 64, \"smt\": true}"),
            "The number of vCPUs",
        ),
        (
            "PUT",
            "/machine-config",
            Some("{\"vcpu_count\": 1, \"mem_size_mib\": 0}"),
            "The memory size",
        ),
        (
            "PUT",
            "/machine-config",
            Some("{\"vcpu_count\": 1, \"mem_size_mib\": 64, \"huge_pages\": \"2M\"}"),
            "The requested operation is not supported: huge pages",
        ),
        (
            "PATCH",
            "/machine-config",
            Some("{}"),
            "Empty PATCH request.",
        ),
        ("PUT", "/machine-config", None, "Empty PUT request."),
        ("PATCH", "/vm", None, "Empty PATCH request."),
        ("GET", "/", Some("{}"), "GET request cannot have a body."),
        (
            "PUT",
            "/boot-source",
            Some("{\"kernel_image_path\": \"/nonexistent/vmlinux\"}"),
            "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2) (/nonexistent/vmlinux)",
        ),
        (
            "PUT",
            "/drives/a-b",
            Some("{}"),
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ),
        ("PUT", "/drives", Some("{}"), "The ID cannot be empty."),
        (
            "PUT",
            "/drives/x",
            Some(&mismatch),
            "The id from the path does not match the id from the body!",
        ),
        (
            "PUT",
            "/drives/x",
            Some("{\"drive_id\": \"x\", \"socket\": \"/nonexistent/s\", \"is_root_device\": false}"),
            "Unable to create the vhost-user-block device: /nonexistent/s: No such file",
        ),
        (
            "PUT",
            "/drives/x",
            Some("{\"drive_id\": \"x\", \"socket\": \"/s\", \"is_read_only\": true, \"is_root_device\": false}"),
            "takes no `path_on_host`, `is_read_only` or `rate_limiter`",
        ),
        (
            "PUT",
            "/drives/x",
            Some("{\"drive_id\": \"x\", \"socket\": \"/etc/hostname\", \"is_root_device\": false}"),
            "/etc/hostname is not a socket",
        ),
        (
            "PUT",
            "/network-interfaces/n",
            Some("{\"iface_id\": \"n\", \"host_dev_name\": \"tap0\", \"guest_mac\": \"zz\"}"),
            "Invalid guest MAC",
        ),
        (
            "PUT",
            "/vsock",
            Some("{\"guest_cid\": 2, \"uds_path\": \"/x\"}"),
            "Invalid guest CID",
        ),
        (
            "PUT",
            "/mmds/config",
            Some("{\"network_interfaces\": [\"nope\"]}"),
            "does not correspond to any existing network interface",
        ),
        ("PUT", "/mmds", Some("[1]"), "must be a JSON object"),
        // As Firecracker: no PATCH before a PUT has created the store.
        (
            "PATCH",
            "/mmds",
            Some("{\"a\": 1}"),
            "The MMDS data store is not initialized.",
        ),
        (
            "PUT",
            "/actions",
            Some("{\"action_type\": \"Reboot\"}"),
            "unknown variant `Reboot`",
        ),
        (
            "PUT",
            "/actions",
            Some("{\"action_type\": \"InstanceStart\"}"),
            "Missing kernel configuration",
        ),
        (
            "PUT",
            "/snapshot/load",
            Some("{\"snapshot_path\": \"/s\"}"),
            "missing field: either `mem_backend` or `mem_file_path` is required",
        ),
        (
            "PUT",
            "/snapshot/load",
            Some("{\"snapshot_path\": \"/s\", \"mem_file_path\": \"/m\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"/m\"}}"),
            "too many fields: either `mem_backend` or `mem_file_path` exclusively is required.",
        ),
        (
            "PUT",
            "/snapshot/load",
            Some(
                "{\"snapshot_path\": \"/s\", \"mem_file_path\": \"/m\", \"vsock_override\": {\"uds_path\": \"/v\", \"guest_cid\": 2}}",
            ),
            "Invalid guest CID 2 in vsock_override",
        ),
        (
            "PUT",
            "/snapshot/load",
            Some(
                "{\"snapshot_path\": \"/s\", \"mem_file_path\": \"/m\", \"vsock_override\": {\"uds_path\": \"/v\", \"guest_cid\": 4294967295}}",
            ),
            "Invalid guest CID 4294967295",
        ),
        (
            "PUT",
            "/snapshot/load",
            Some(
                "{\"snapshot_path\": \"/s\", \"mem_file_path\": \"/m\", \"vsock_override\": {\"uds_path\": \"/v\", \"guest_cid\": 4294967296}}",
            ),
            "invalid value",
        ),
        (
            "PUT",
            "/vessel/cloud-init",
            Some("{\"user_data\": \"#cloud-config\", \"vendor_data\": \"x\"}"),
            "unknown field `vendor_data`",
        ),
        (
            "PUT",
            "/vessel/cloud-init",
            Some("{\"meta_data\": \"instance-id: x\"}"),
            "missing field `user_data`",
        ),
        (
            "PUT",
            "/vessel/cloud-init",
            Some("{\"user_data\": \"hello\"}"),
            "Cloud-init seed error",
        ),
        ("PUT", "/vessel/cloud-init", None, "Empty PUT request."),
        (
            "PUT",
            "/vessel/fs/x",
            Some(&fs_both),
            "Fs config error: give either `socket` or `shared_dir`, not both.",
        ),
        (
            "PUT",
            "/vessel/fs/x",
            Some("{\"id\": \"x\", \"tag\": \"x\", \"shared_dir\": \"/nonexistent/dir\"}"),
            "Fs config error: /nonexistent/dir: No such file or directory",
        ),
        (
            "PUT",
            "/vessel/fs/x",
            Some(&fs_long_tag),
            "Fs config error: the tag must be 1 to 36 bytes long, not 37.",
        ),
        (
            "PUT",
            "/vessel/fs/x",
            Some("{\"id\": \"x\", \"tag\": \"x\", \"shared_dir\": \"/\", \"num_queues\": 0}"),
            "Fs config error: num_queues must be 1 to 16, not 0.",
        ),
        (
            "PUT",
            "/vessel/fs/x",
            Some("{\"id\": \"x\", \"tag\": \"x\", \"shared_dir\": \"/\", \"cache\": \"never\"}"),
            "unknown field `cache`",
        ),
        (
            "PUT",
            "/vessel/fs/y",
            Some("{\"id\": \"x\", \"tag\": \"x\", \"shared_dir\": \"/\"}"),
            "The id from the path does not match the id from the body!",
        ),
        (
            "DELETE",
            "/balloon",
            None,
            "Invalid request method and/or path: DELETE /balloon.",
        ),
        (
            "POST",
            "/drives/x",
            None,
            "Invalid request method and/or path: POST /drives/x.",
        ),
        (
            "DELETE",
            "/pmem/x",
            Some("{}"),
            "Empty Delete request.",
        ),
        (
            "GET",
            "/nope",
            None,
            "Invalid request method and/or path: GET /nope.",
        ),
    ];
    for (m, p, body, want) in cases {
        let r = c.request(m, p, body).unwrap();
        check_response(m, p, &r);
        assert_eq!(r.status, 400, "{m} {p}: {}", r.text());
        let msg = r.json()["fault_message"].as_str().unwrap_or("").to_string();
        assert!(msg.contains(want), "{m} {p}: {msg:?} lacks {want:?}");
    }
    // Two root devices.
    let root = |id: &str| json!({"drive_id": id, "path_on_host": rootfs, "is_root_device": true, "is_read_only": false});
    assert_eq!(
        env.call(&mut c, "PUT", "/drives/a", Some(root("a"))).status,
        204
    );
    let r = env.call(&mut c, "PUT", "/drives/b", Some(root("b")));
    assert_eq!(
        r.json()["fault_message"],
        "Drive config error: A root block device already exists!"
    );
    // A rejected update leaves the configuration as it was.
    let before = env.call(&mut c, "GET", "/machine-config", None).json();
    assert_eq!(
        before,
        json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false, "track_dirty_pages": false, "huge_pages": "None"})
    );
    // MMDS over its limit is 413.
    let big = json!({"k": "x".repeat(52000)}).to_string();
    let r = c.request("PUT", "/mmds", Some(&big)).unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    check_response("PUT", "/mmds", &r);
}

fn raw(env: &Env, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(&env.sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn framing_errors_close_the_connection_with_a_fault() {
    let env = Env::new();
    let r = raw(
        &env,
        b"PUT /mmds HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    assert!(
        r.contains("Connection: close") && r.contains("\"fault_message\":\"Transfer-Encoding"),
        "{r}"
    );
    let r = raw(
        &env,
        format!(
            "PUT /mmds HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            65 * 1024
        )
        .as_bytes(),
    );
    // Firecracker's answer (its bytes: see the unit test in http.rs).
    assert!(r.starts_with("HTTP/1.1 400 \r\n"), "{r}");
    assert!(
        r.contains("Request payload with size 66560 is larger than the limit of 65536"),
        "{r}"
    );
    let r = raw(&env, b"GARBAGE\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.1 400 ") && r.contains("fault_message"),
        "{r}"
    );
    let r = raw(
        &env,
        format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10000)).as_bytes(),
    );
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    // Pipelined requests on one connection, answered in order; the last closes.
    let r = raw(&env, b"GET /version HTTP/1.1\r\n\r\nPUT /mmds HTTP/1.1\r\nContent-Length: 8\r\n\r\n{\"a\":1}\nGET /mmds HTTP/1.1\r\nConnection: close\r\n\r\n");
    let statuses: Vec<&str> = r.matches("HTTP/1.1 ").map(|_| "").collect();
    assert_eq!(statuses.len(), 3, "{r}");
    assert!(
        r.contains("HTTP/1.1 204") && r.ends_with("{\"a\":1}"),
        "{r}"
    );
    // Expect: 100-continue (curl sends it for bodies over 1 KiB).
    let mut s = UnixStream::connect(&env.sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"PUT /mmds HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 8\r\nConnection: close\r\n\r\n").unwrap();
    let mut cont = [0u8; 25];
    s.read_exact(&mut cont).unwrap();
    assert_eq!(&cont, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"{\"b\":2}\n").unwrap();
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
}

#[test]
fn slow_client_times_out_without_blocking_others() {
    let cfg = ServerConfig {
        request_timeout: Duration::from_millis(500),
        limits: Limits::default(),
        ..Default::default()
    };
    let env = Env::with_config(cfg);
    let mut slow = UnixStream::connect(&env.sock).unwrap();
    slow.set_read_timeout(Some(T)).unwrap();
    slow.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"vcpu")
        .unwrap();
    // Another client is served while the slow one stalls.
    let mut c = env.client();
    for _ in 0..5 {
        assert_eq!(env.call(&mut c, "GET", "/", None).status, 200);
    }
    let mut out = String::new();
    let _ = slow.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
    // A client that half-closes after a full request still gets its answer.
    let mut h = UnixStream::connect(&env.sock).unwrap();
    h.set_read_timeout(Some(T)).unwrap();
    h.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
    h.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    let _ = h.read_to_string(&mut out);
    assert!(out.contains("firecracker_version"), "{out}");
}

#[test]
fn concurrent_clients() {
    let env = Env::new();
    let sock = env.sock.clone();
    env.call(&mut env.client(), "PUT", "/mmds", Some(json!({})));
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = Client::new(&sock, T);
                for j in 0..20 {
                    let body = json!({format!("k{i}"): j}).to_string();
                    let r = c.request("PATCH", "/mmds", Some(&body)).unwrap();
                    assert_eq!(r.status, 204, "{}", r.text());
                    let r = c.request("GET", "/", None).unwrap();
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut c = env.client();
    let mmds = env.call(&mut c, "GET", "/mmds", None).json();
    for i in 0..20 {
        assert_eq!(mmds[format!("k{i}")], 19);
    }
    let prom = env.call(&mut c, "GET", "/vessel/metrics", None).text();
    assert!(
        prom.contains("vessel_api_requests_total{method=\"PATCH\",path=\"/mmds\"} 400"),
        "{prom}"
    );
}

#[test]
fn too_many_connections_get_503() {
    let cfg = ServerConfig {
        max_connections: 2,
        ..Default::default()
    };
    let env = Env::with_config(cfg);
    let mut held: Vec<Client> = (0..2).map(|_| env.client()).collect();
    for c in &mut held {
        assert_eq!(c.request("GET", "/", None).unwrap().status, 200);
    }
    let r = env.client().request("GET", "/", None).unwrap();
    assert_eq!(r.status, 503);
    drop(held);
}

#[test]
fn config_file_builds_the_same_resources() {
    let env = Env::new();
    let cfg = json!({
        "boot-source": {"kernel_image_path": env.p("vmlinux"), "initrd_path": env.p("initrd"), "boot_args": "console=ttyS0 reboot=k"},
        "drives": [
            {"drive_id": "data", "path_on_host": env.p("data.img"), "is_root_device": false, "is_read_only": true},
            {"drive_id": "rootfs", "path_on_host": env.p("rootfs.ext4"), "is_root_device": true, "is_read_only": false}
        ],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
        "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"},
        "balloon": {"amount_mib": 0, "deflate_on_oom": false},
        "entropy": {},
        "logger": {"level": "Debug"},
        "mmds-config": {"network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2"},
        "vessel-fs": [{"id": "share", "tag": "share", "shared_dir": env.dir, "num_queues": 2}]
    });
    openapi::validate(&json!({"$ref": "#/definitions/FullVmConfiguration"}), &cfg).unwrap();
    let r = VmResources::from_config_json(&cfg.to_string(), Some("{\"latest\": {}}")).unwrap();
    assert_eq!(r.machine_config.vcpu_count, 2);
    assert_eq!(r.drives[0].drive_id, "rootfs", "root device first");
    assert_eq!(r.mmds_address(), Some("169.254.170.2".parse().unwrap()));
    assert_eq!(r.mmds.get(), json!({"latest": {}}));
    // Round trip through GET /vm/config's form.
    let exported = serde_json::to_value(r.to_full_vm_config()).unwrap();
    openapi::validate(
        &json!({"$ref": "#/definitions/FullVmConfiguration"}),
        &exported,
    )
    .unwrap();
    let again = VmResources::from_config_json(&exported.to_string(), None).unwrap();
    assert_eq!(again.to_full_vm_config(), r.to_full_vm_config());
    // Same validation as the API.
    let mut bad = cfg.clone();
    bad["machine-config"]["vcpu_count"] = json!(0);
    let e = VmResources::from_config_json(&bad.to_string(), None).unwrap_err();
    assert!(e.to_string().contains("The number of vCPUs"), "{e}");
    let mut bad = cfg.clone();
    bad["unknown"] = json!(1);
    assert!(VmResources::from_config_json(&bad.to_string(), None).is_err());
    assert_eq!(r.fs.len(), 1);
    assert_eq!(r.fs[0].num_queues, Some(2));
    let mut bad = cfg.clone();
    bad["vessel-fs"][0]["shared_dir"] = json!(env.p("vmlinux"));
    let e = VmResources::from_config_json(&bad.to_string(), None).unwrap_err();
    assert!(e.to_string().contains("is not a directory"), "{e}");
    let mut bad = cfg;
    bad.as_object_mut().unwrap().remove("boot-source");
    assert!(VmResources::from_config_json(&bad.to_string(), None).is_err());
    // A controller adopts it and starts without further calls.
    let mut ctl = ApiController::new(Box::new(Mock::default()), "vm1", "1.7.0")
        .with_resources(r)
        .unwrap();
    ctl.start().unwrap();
    assert_eq!(ctl.state(), InstanceState::Running);
}

#[test]
fn a_second_cloud_init_seed_replaces_the_first_and_a_refused_one_changes_nothing() {
    let env = Env::new();
    let mut c = env.client();
    let put = |c: &mut Client, body: Value| {
        check_request("PUT", "/vessel/cloud-init", &body);
        env.call(c, "PUT", "/vessel/cloud-init", Some(body))
    };
    assert_eq!(
        put(&mut c, json!({"user_data": "#cloud-config\na: 1\n"})).status,
        204
    );
    let second = json!({"user_data": "#!/bin/sh\necho hi\n", "network_config": "version: 2\n"});
    assert_eq!(put(&mut c, second.clone()).status, 204);
    let r = env.call(
        &mut c,
        "PUT",
        "/vessel/cloud-init",
        Some(json!({"user_data": "nope"})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let cfg = env.call(&mut c, "GET", "/vm/config", None).json();
    assert_eq!(cfg["vessel-cloud-init"], second, "{cfg}");
    // A seed is boot-specific: a snapshot can no longer be loaded.
    let r = env.call(
        &mut c,
        "PUT",
        "/snapshot/load",
        Some(json!({"snapshot_path": "/s", "mem_file_path": "/m"})),
    );
    assert!(
        r.text().contains("not allowed after configuring"),
        "{}",
        r.text()
    );
    // The config file takes it too, and exports it the same way.
    let file = json!({
        "boot-source": {"kernel_image_path": env.p("vmlinux")},
        "vessel-cloud-init": second
    });
    let res = VmResources::from_config_json(&file.to_string(), None).unwrap();
    assert_eq!(
        res.cloud_init.as_ref().unwrap().user_data,
        "#!/bin/sh\necho hi\n"
    );
    assert_eq!(
        serde_json::to_value(res.to_full_vm_config()).unwrap()["vessel-cloud-init"],
        second
    );
}

/// Firecracker's deprecated fields are served, with `Deprecation: true`, a warning and a count
/// in `deprecated_api`; the same requests without them get no header.
#[test]
fn deprecated_fields_get_the_deprecation_header() {
    let env = Env::new();
    let mut c = env.client();
    let metrics_path = env.p("metrics.json");
    env.call(
        &mut c,
        "PUT",
        "/metrics",
        Some(json!({"metrics_path": metrics_path})),
    );
    let cases: Vec<(&str, &str, Value, bool)> = vec![
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "None"}),
            true,
        ),
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 64}),
            false,
        ),
        (
            "PATCH",
            "/machine-config",
            json!({"cpu_template": "None"}),
            true,
        ),
        (
            "PUT",
            "/vsock",
            json!({"vsock_id": "v", "guest_cid": 3, "uds_path": "/tmp/v.sock"}),
            true,
        ),
        (
            "PUT",
            "/vsock",
            json!({"guest_cid": 3, "uds_path": "/tmp/v.sock"}),
            false,
        ),
        // A refused request is marked too (Firecracker parses before it serves).
        (
            "PUT",
            "/snapshot/load",
            json!({"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}),
            true,
        ),
    ];
    let mut deprecated = 0;
    for (m, p, body, want) in cases {
        let text = body.to_string();
        let r = c.request(m, p, Some(&text)).unwrap();
        assert_eq!(
            r.header("deprecation"),
            want.then_some("true"),
            "{m} {p} {body}"
        );
        deprecated += usize::from(want);
    }
    // The line written at InstanceStart counts them.
    let vmlinux = env.p("vmlinux");
    env.call(
        &mut c,
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": vmlinux})),
    );
    let r = env.call(
        &mut c,
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let line = std::fs::read_to_string(&metrics_path).unwrap();
    let line: Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(
        line["deprecated_api"]["deprecated_http_api_calls"],
        deprecated as u64
    );
}

/// Firecracker's `test_pmem_api` and `test_pmem_rate_limiter_api` (its integration suite),
/// the parts that need no guest.
#[test]
fn pmem_api_follows_firecracker() {
    let env = Env::new();
    let mut c = env.client();
    let data = env.p("data.img");
    let fault = |r: ClientResponse| {
        assert_eq!(r.status, 400, "{}", r.text());
        r.json()["fault_message"].as_str().unwrap().to_string()
    };
    let put = |c: &mut Client, id: &str, body: Value| {
        env.call(c, "PUT", &format!("/pmem/{id}"), Some(body))
    };
    let e = fault(put(&mut c, "pmem", json!({"id": "pmem"})));
    assert!(
        e.starts_with("An error occurred when deserializing the json body of a request: missing field `path_on_host`"),
        "{e}"
    );
    let drive = |root: bool| json!({"drive_id": "drive", "path_on_host": data, "is_root_device": root, "is_read_only": false});
    assert_eq!(
        env.call(&mut c, "PUT", "/drives/drive", Some(drive(true)))
            .status,
        204
    );
    let e = fault(put(
        &mut c,
        "pmem",
        json!({"id": "pmem", "path_on_host": data, "root_device": true}),
    ));
    assert!(
        e.contains(
            "Attempt to add pmem as a root device while the root device defined as a block device"
        ),
        "{e}"
    );
    assert_eq!(
        env.call(&mut c, "PUT", "/drives/drive", Some(drive(false)))
            .status,
        204
    );
    assert_eq!(
        put(
            &mut c,
            "pmem",
            json!({"id": "pmem", "path_on_host": data, "root_device": true})
        )
        .status,
        204
    );
    let e = fault(put(
        &mut c,
        "pmem2",
        json!({"id": "pmem2", "path_on_host": data, "root_device": true}),
    ));
    assert!(e.contains("A root pmem device already exist"), "{e}");
    let e = fault(env.call(&mut c, "PUT", "/drives/drive", Some(drive(true))));
    assert!(
        e.contains(
            "Attempt to add block as a root device while the root device defined as a pmem device"
        ),
        "{e}"
    );
    let e = fault(put(
        &mut c,
        "other",
        json!({"id": "pmem", "path_on_host": data}),
    ));
    assert_eq!(
        e,
        "The id from the path does not match the id from the body!"
    );

    // The rate limiter at creation shows in GET /vm/config; a PUT without one clears it.
    let rl = json!({"bandwidth": {"size": 1000000, "refill_time": 100}, "ops": {"size": 10, "refill_time": 1000}});
    assert_eq!(
        put(
            &mut c,
            "pmem0",
            json!({"id": "pmem0", "path_on_host": data, "rate_limiter": rl})
        )
        .status,
        204
    );
    let cfg = env.call(&mut c, "GET", "/vm/config", None).json();
    assert_eq!(cfg["pmem"][1]["rate_limiter"]["bandwidth"]["size"], 1000000);
    assert_eq!(cfg["pmem"][1]["rate_limiter"]["ops"]["size"], 10);
    assert_eq!(
        put(
            &mut c,
            "pmem0",
            json!({"id": "pmem0", "path_on_host": data})
        )
        .status,
        204
    );
    let cfg = env.call(&mut c, "GET", "/vm/config", None).json();
    assert!(cfg["pmem"][1]
        .as_object()
        .unwrap()
        .contains_key("rate_limiter"));
    assert_eq!(cfg["pmem"][1]["rate_limiter"], Value::Null);

    let patch = |c: &mut Client, id: &str, body: Value| {
        env.call(c, "PATCH", &format!("/pmem/{id}"), Some(body))
    };
    let e = fault(patch(
        &mut c,
        "nonexistent",
        json!({"id": "nonexistent", "rate_limiter": {"ops": {"size": 1, "refill_time": 100}}}),
    ));
    assert_eq!(
        e,
        "The requested operation is not supported before starting the microVM."
    );
    let r = env.call(
        &mut c,
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": env.p("vmlinux")})),
    );
    assert_eq!(r.status, 204);
    let r = env.call(
        &mut c,
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    // After boot: a PUT of a configured id is no hot-plug; rate limiter patches, whole or
    // in part.
    assert_eq!(
        fault(put(
            &mut c,
            "pmem",
            json!({"id": "pmem", "path_on_host": data})
        )),
        "Device ID in use"
    );
    for body in [
        json!({"id": "pmem0", "rate_limiter": {"bandwidth": {"size": 5000, "refill_time": 100}, "ops": {"size": 500, "refill_time": 100}}}),
        json!({"id": "pmem0", "rate_limiter": {"bandwidth": {"size": 2000000, "refill_time": 200}}}),
        json!({"id": "pmem0", "rate_limiter": {"ops": {"size": 100, "refill_time": 500}}}),
        json!({"id": "pmem0"}),
    ] {
        let r = patch(&mut c, "pmem0", body.clone());
        assert_eq!(r.status, 204, "{body}: {}", r.text());
    }
    let cfg = env.call(&mut c, "GET", "/vm/config", None).json();
    assert_eq!(
        cfg["pmem"][1]["rate_limiter"],
        json!({"bandwidth": {"size": 2000000, "one_time_burst": null, "refill_time": 200},
               "ops": {"size": 100, "one_time_burst": null, "refill_time": 500}})
    );
    let e = fault(patch(
        &mut c,
        "pmem0",
        json!({"id": "pmem0", "path_on_host": "foo", "rate_limiter": {"ops": {"size": 1, "refill_time": 100}}}),
    ));
    assert!(e.contains("unknown field"), "{e}");
    let e = fault(patch(
        &mut c,
        "nonexistent",
        json!({"id": "nonexistent", "rate_limiter": {"ops": {"size": 1, "refill_time": 100}}}),
    ));
    assert!(e.contains("not found"), "{e}");
    let calls = env.calls.lock().unwrap().clone();
    assert_eq!(
        calls.iter().filter(|c| *c == "update_pmem pmem0").count(),
        4,
        "{calls:?}"
    );
}

#[test]
fn memory_hotplug_is_checked_as_firecracker_checks_it() {
    let env = Env::new();
    let mut c = env.client();
    let msg = |r: vessel_api::client::ClientResponse| {
        (
            r.status,
            r.json()["fault_message"].as_str().unwrap_or("").to_string(),
        )
    };
    for (body, want) in [
        (
            json!({"total_size_mib": 1024, "block_size_mib": 1}),
            "Memory hotplug config error: Block size must not be lower than 2 MiB",
        ),
        (
            json!({"total_size_mib": 1024, "block_size_mib": 3}),
            "Memory hotplug config error: Block size must be a power of 2",
        ),
        (
            json!({"total_size_mib": 1024, "slot_size_mib": 64}),
            "Memory hotplug config error: Slot size must not be lower than 128 MiB",
        ),
        (
            json!({"total_size_mib": 1024, "block_size_mib": 4, "slot_size_mib": 130}),
            "Memory hotplug config error: Slot size must be a multiple of block size (4 MiB)",
        ),
        (
            json!({"total_size_mib": 64}),
            "Memory hotplug config error: Total size must not be lower than slot size (128 MiB)",
        ),
        (
            json!({"total_size_mib": 1000}),
            "Memory hotplug config error: Total size must be a multiple of slot size (128 MiB)",
        ),
    ] {
        let r = env.call(&mut c, "PUT", "/hotplug/memory", Some(body.clone()));
        assert_eq!(msg(r), (400, want.to_string()), "{body}");
    }
    let r = env.call(
        &mut c,
        "PUT",
        "/hotplug/memory",
        Some(json!({"block_size_mib": 2})),
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("total_size_mib"), "{}", r.text());
    // Nothing was configured by the refusals.
    let cfg = env.call(&mut c, "GET", "/vm/config", None).json();
    assert_eq!(cfg["memory-hotplug"], Value::Null, "{cfg}");
    // Before start, GET and PATCH are refused as Firecracker refuses them.
    let r = env.call(&mut c, "GET", "/hotplug/memory", None);
    assert_eq!(
        msg(r),
        (
            400,
            "The requested operation is not supported before starting the microVM.".into()
        )
    );
    // Started without the device: Firecracker's "not found".
    let r = env.call(
        &mut c,
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": env.p("vmlinux")})),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let r = env.call(
        &mut c,
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let r = env.call(&mut c, "GET", "/hotplug/memory", None);
    assert_eq!(
        msg(r),
        (
            400,
            "Internal VMM error: Failed perform action on device: Device not found".into()
        )
    );
    let r = env.call(
        &mut c,
        "PATCH",
        "/hotplug/memory",
        Some(json!({"requested_size_mib": 128})),
    );
    assert_eq!(
        msg(r),
        (
            400,
            "Memory hotplug update error: Failed perform action on device: Device not found".into()
        )
    );
    let r = env.call(
        &mut c,
        "PUT",
        "/hotplug/memory",
        Some(json!({"total_size_mib": 1024})),
    );
    assert_eq!(
        msg(r),
        (
            400,
            "The requested operation is not supported after starting the microVM.".into()
        )
    );
}

/// Firecracker 1.16's device hotplug: after InstanceStart, `PUT` on `/drives`,
/// `/network-interfaces` and `/pmem` hot-plugs a device and `DELETE` hot-unplugs one, and
/// `GET /vm/config` follows what the VMM did.
#[test]
fn devices_hotplug_and_unplug_after_start() {
    let env = Env::new();
    let mut c = env.client();
    let data = env.p("data.img");
    let fault = |r: ClientResponse| {
        assert_eq!(r.status, 400, "{}", r.text());
        r.json()["fault_message"].as_str().unwrap().to_string()
    };
    let ok = |r: ClientResponse| assert_eq!(r.status, 204, "{}", r.text());
    let drive = |id: &str, root: bool| json!({"drive_id": id, "path_on_host": data, "is_root_device": root, "is_read_only": false});
    let net = |id: &str, tap: &str, mac: &str| json!({"iface_id": id, "host_dev_name": tap, "guest_mac": mac});
    let pmem = |id: &str, root: bool| json!({"id": id, "path_on_host": data, "root_device": root});
    let ids = |c: &mut Client, key: &str, field: &str| -> Vec<String> {
        let cfg = env.call(c, "GET", "/vm/config", None).json();
        cfg[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d[field].as_str().unwrap().to_string())
            .collect()
    };

    // Before boot: PUTs configure, DELETEs are refused.
    ok(env.call(
        &mut c,
        "PUT",
        "/boot-source",
        Some(json!({"kernel_image_path": env.p("vmlinux")})),
    ));
    ok(env.call(&mut c, "PUT", "/drives/rootfs", Some(drive("rootfs", true))));
    ok(env.call(&mut c, "PUT", "/drives/busy", Some(drive("busy", false))));
    ok(env.call(
        &mut c,
        "PUT",
        "/network-interfaces/eth0",
        Some(net("eth0", "tap0", "06:00:00:00:00:01")),
    ));
    ok(env.call(&mut c, "PUT", "/pmem/pm0", Some(pmem("pm0", false))));
    assert_eq!(
        fault(env.call(&mut c, "DELETE", "/drives/busy", None)),
        "The requested operation is not supported before starting the microVM."
    );
    assert_eq!(
        fault(env.call(&mut c, "DELETE", "/pmem/pm0", None)),
        "The requested operation is not supported before starting the microVM."
    );
    ok(env.call(
        &mut c,
        "PUT",
        "/actions",
        Some(json!({"action_type": "InstanceStart"})),
    ));

    // Hot-plug: an id in use, a root device, a body that fails the pre-boot checks and a
    // VMM that fails are refused, and change nothing.
    let e = fault(env.call(&mut c, "PUT", "/drives/rootfs", Some(drive("rootfs", true))));
    assert_eq!(e, "Device ID in use");
    let e = fault(env.call(&mut c, "PUT", "/drives/busy", Some(drive("busy", false))));
    assert_eq!(e, "Device ID in use");
    let e = fault(env.call(&mut c, "PUT", "/drives/disk1", Some(drive("disk1", true))));
    assert_eq!(e, "Drive config error: A root block device already exists!");
    let mut missing = drive("disk1", false);
    missing["path_on_host"] = json!("/nonexistent/disk1.img");
    let e = fault(env.call(&mut c, "PUT", "/drives/disk1", Some(missing)));
    assert!(e.starts_with("Drive config error:"), "{e}");
    let e = fault(env.call(
        &mut c,
        "PUT",
        "/drives/refused1",
        Some(drive("refused1", false)),
    ));
    assert_eq!(e, "hotplug_drive: the VMM refused refused1");
    assert_eq!(ids(&mut c, "drives", "drive_id"), ["rootfs", "busy"]);

    let e = fault(env.call(
        &mut c,
        "PUT",
        "/network-interfaces/eth0",
        Some(net("eth0", "tap9", "06:00:00:00:00:09")),
    ));
    assert_eq!(e, "Device ID in use");
    let e = fault(env.call(
        &mut c,
        "PUT",
        "/network-interfaces/eth1",
        Some(net("eth1", "tap1", "06:00:00:00:00:01")),
    ));
    assert!(e.contains("The MAC address is already in use"), "{e}");
    let e = fault(env.call(
        &mut c,
        "PUT",
        "/network-interfaces/refused",
        Some(net("refused", "tap7", "06:00:00:00:00:07")),
    ));
    assert_eq!(e, "hotplug_network_interface: the VMM refused refused");
    assert_eq!(ids(&mut c, "network-interfaces", "iface_id"), ["eth0"]);

    let e = fault(env.call(&mut c, "PUT", "/pmem/pm0", Some(pmem("pm0", false))));
    assert_eq!(e, "Device ID in use");
    let e = fault(env.call(&mut c, "PUT", "/pmem/pm1", Some(pmem("pm1", true))));
    assert_eq!(
        e,
        "Pmem config error: Attempt to add pmem as a root device while the root device defined as a block device"
    );
    let e = fault(env.call(&mut c, "PUT", "/pmem/refused", Some(pmem("refused", false))));
    assert_eq!(e, "hotplug_pmem: the VMM refused refused");
    assert_eq!(ids(&mut c, "pmem", "id"), ["pm0"]);

    // Hot-plugs that succeed reach the VMM and show in GET /vm/config.
    ok(env.call(&mut c, "PUT", "/drives/disk1", Some(drive("disk1", false))));
    ok(env.call(
        &mut c,
        "PUT",
        "/network-interfaces/eth1",
        Some(net("eth1", "tap1", "06:00:00:00:00:02")),
    ));
    ok(env.call(&mut c, "PUT", "/pmem/pm1", Some(pmem("pm1", false))));
    // While paused too.
    ok(env.call(&mut c, "PATCH", "/vm", Some(json!({"state": "Paused"}))));
    ok(env.call(&mut c, "PUT", "/drives/disk2", Some(drive("disk2", false))));
    ok(env.call(&mut c, "PATCH", "/vm", Some(json!({"state": "Resumed"}))));
    assert_eq!(
        ids(&mut c, "drives", "drive_id"),
        ["rootfs", "busy", "disk1", "disk2"]
    );
    assert_eq!(
        ids(&mut c, "network-interfaces", "iface_id"),
        ["eth0", "eth1"]
    );
    assert_eq!(ids(&mut c, "pmem", "id"), ["pm0", "pm1"]);
    let e = fault(env.call(&mut c, "PUT", "/drives/disk1", Some(drive("disk1", false))));
    assert_eq!(e, "Device ID in use");

    // Hot-unplug: unknown ids, the root device, bad ids, a body and a VMM that fails are
    // refused, and change nothing.
    assert_eq!(
        fault(env.call(&mut c, "DELETE", "/drives/nope", None)),
        "Device not found"
    );
    assert_eq!(
        fault(env.call(&mut c, "DELETE", "/drives/pm0", None)),
        "Device not found",
        "a pmem id is no drive id"
    );
    assert_eq!(
        fault(env.call(&mut c, "DELETE", "/network-interfaces/nope", None)),
        "Device not found"
    );
    assert_eq!(
        fault(env.call(&mut c, "DELETE", "/pmem/nope", None)),
        "Device not found"
    );
    assert_eq!(
        fault(env.call(&mut c, "DELETE", "/drives/rootfs", None)),
        "Cannot unplug root device"
    );
    assert_eq!(
        fault(env.call(&mut c, "DELETE", "/drives/a-b", None)),
        "API Resource IDs can only contain alphanumeric characters and underscores."
    );
    assert_eq!(
        fault(env.call(&mut c, "DELETE", "/drives", None)),
        "The ID cannot be empty."
    );
    assert_eq!(
        fault(env.call(&mut c, "DELETE", "/drives/disk1", Some(json!({})))),
        "Empty Delete request."
    );
    let r = env.call(&mut c, "DELETE", "/drives/busy", None);
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(
        r.json()["fault_message"],
        "Internal VMM error: busy is still in use"
    );
    assert_eq!(
        ids(&mut c, "drives", "drive_id"),
        ["rootfs", "busy", "disk1", "disk2"]
    );

    // Unplugs that succeed reach the VMM and leave GET /vm/config.
    ok(env.call(&mut c, "DELETE", "/drives/disk1", None));
    ok(env.call(&mut c, "DELETE", "/network-interfaces/eth0", None));
    ok(env.call(&mut c, "DELETE", "/pmem/pm0", None));
    assert_eq!(
        ids(&mut c, "drives", "drive_id"),
        ["rootfs", "busy", "disk2"]
    );
    assert_eq!(ids(&mut c, "network-interfaces", "iface_id"), ["eth1"]);
    assert_eq!(ids(&mut c, "pmem", "id"), ["pm1"]);
    assert_eq!(
        fault(env.call(&mut c, "DELETE", "/drives/disk1", None)),
        "Device not found"
    );
    // The id is free again: the device can come back.
    ok(env.call(&mut c, "PUT", "/drives/disk1", Some(drive("disk1", false))));
    assert_eq!(
        ids(&mut c, "drives", "drive_id"),
        ["rootfs", "busy", "disk2", "disk1"]
    );

    let calls = env.calls.lock().unwrap().clone();
    let hot: Vec<&str> = calls
        .iter()
        .map(String::as_str)
        .filter(|c| c.starts_with("hotplug_") || c.starts_with("unplug"))
        .collect();
    assert_eq!(
        hot,
        [
            "hotplug_drive disk1",
            "hotplug_network_interface eth1",
            "hotplug_pmem pm1",
            "hotplug_drive disk2",
            "unplug Drive(\"disk1\")",
            "unplug NetworkInterface(\"eth0\")",
            "unplug Pmem(\"pm0\")",
            "hotplug_drive disk1",
        ]
    );
    // DELETEs count under their PUT's metric (Prometheus; Firecracker's line has no DELETE
    // group).
    let prom = env.call(&mut c, "GET", "/vessel/metrics", None).text();
    assert!(
        prom.contains("vessel_api_requests_total{method=\"DELETE\",path=\"/drives/{drive_id}\"} 9"),
        "{prom}"
    );
    assert!(
        prom.contains(
            "vessel_api_request_failures_total{method=\"DELETE\",path=\"/drives/{drive_id}\"} 8"
        ),
        "{prom}"
    );
}

/// A VMM without hotplug answers the defaults, and the configuration does not change.
#[test]
fn a_vmm_without_hotplug_refuses_it() {
    struct Bare;
    impl VmmBackend for Bare {
        fn start(&mut self, _: &VmResources) -> Result<(), ApiError> {
            Ok(())
        }
    }
    let env = Env::new();
    let data = env.p("data.img");
    let mut ctl = ApiController::new(Box::new(Bare), "vm1", "1.7.0");
    ctl.put_boot_source(
        serde_json::from_value(json!({"kernel_image_path": env.p("vmlinux")})).unwrap(),
    )
    .unwrap();
    ctl.put_drive(
        serde_json::from_value(json!({"drive_id": "d0", "path_on_host": data, "is_root_device": false, "is_read_only": true}))
            .unwrap(),
    )
    .unwrap();
    ctl.start().unwrap();
    let e = ctl
        .put_drive(
            serde_json::from_value(json!({"drive_id": "d1", "path_on_host": data, "is_root_device": false, "is_read_only": true}))
                .unwrap(),
        )
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "The requested operation is not supported: hotplugging a drive"
    );
    let e = ctl
        .put_network_interface(
            serde_json::from_value(json!({"iface_id": "eth0", "host_dev_name": "tap0"})).unwrap(),
        )
        .unwrap_err();
    assert_eq!(
        e,
        ApiError::Unsupported("hotplugging a network interface".into())
    );
    let e = ctl
        .put_pmem(serde_json::from_value(json!({"id": "p", "path_on_host": data})).unwrap())
        .unwrap_err();
    assert_eq!(e, ApiError::Unsupported("hotplugging a pmem device".into()));
    let e = ctl
        .unplug_device(PluggedDevice::Drive("d0".into()))
        .unwrap_err();
    assert_eq!(e, ApiError::Unsupported("hot-unplugging a device".into()));
    let r = ctl.resources();
    assert_eq!(
        r.drives
            .iter()
            .map(|d| d.drive_id.as_str())
            .collect::<Vec<_>>(),
        ["d0"]
    );
    assert!(r.network_interfaces.is_empty() && r.pmem.is_empty());
    // The type is reachable from the backend module too.
    let _: vessel_api::backend::PluggedDevice = PluggedDevice::Pmem("p".into());
}

/// Pre-boot updates as Firecracker makes them: a drive without `is_read_only` is writable;
/// a MAC in use is refused and changes nothing; an interface update that fails past that
/// check (its TAP in use) leaves the interface gone, its MAC free for another.
#[test]
fn preboot_updates_of_drives_and_interfaces_follow_firecracker() {
    let env = Env::new();
    let mut c = env.client();
    let status = |r: ClientResponse| (r.status, r.json()["fault_message"].clone());
    let net = |id: &str, tap: &str, mac: &str| json!({"iface_id": id, "host_dev_name": tap, "guest_mac": mac});
    let config = |c: &mut Client| env.call(c, "GET", "/vm/config", None).json();

    let r = env.call(
        &mut c,
        "PUT",
        "/drives/rootfs",
        Some(json!({"drive_id": "rootfs", "path_on_host": env.p("rootfs.ext4"), "is_root_device": true})),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(config(&mut c)["drives"][0]["is_read_only"], json!(false));

    for (id, tap, mac) in [
        ("1", "tap1", "06:00:00:00:00:01"),
        ("2", "tap2", "06:00:00:00:00:02"),
    ] {
        let r = env.call(
            &mut c,
            "PUT",
            &format!("/network-interfaces/{id}"),
            Some(net(id, tap, mac)),
        );
        assert_eq!(r.status, 204, "{}", r.text());
    }
    // Another interface's MAC: refused, nothing changes.
    let (s, m) = status(env.call(
        &mut c,
        "PUT",
        "/network-interfaces/2",
        Some(net("2", "tap2", "06:00:00:00:00:01")),
    ));
    assert_eq!(s, 400);
    assert!(
        m.as_str()
            .unwrap()
            .contains("The MAC address is already in use: 06:00:00:00:00:01"),
        "{m}"
    );
    assert_eq!(
        config(&mut c)["network-interfaces"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Interface 1 on interface 2's TAP: refused, and interface 1 is gone.
    let (s, m) = status(env.call(
        &mut c,
        "PUT",
        "/network-interfaces/1",
        Some(net("1", "tap2", "06:00:00:00:00:01")),
    ));
    assert_eq!(s, 400);
    assert!(
        m.as_str()
            .unwrap()
            .starts_with("Could not create the network device"),
        "{m}"
    );
    let ifaces = config(&mut c)["network-interfaces"].clone();
    assert_eq!(ifaces.as_array().unwrap().len(), 1, "{ifaces}");
    assert_eq!(ifaces[0]["iface_id"], "2");
    // Its MAC is free again.
    let r = env.call(
        &mut c,
        "PUT",
        "/network-interfaces/3",
        Some(net("3", "tap3", "06:00:00:00:00:01")),
    );
    assert_eq!(r.status, 204, "{}", r.text());
}
