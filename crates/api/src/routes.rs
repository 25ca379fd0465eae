//! THE route table: every endpoint is declared once, with its method, path pattern,
//! `operationId` in `openapi.json`, request and response schemas (from the Rust types), the
//! metric it counts under, and its handler. Routing, body decoding, the pre-boot/post-boot
//! rules (in the controller) and metrics all come from this one list, and a test checks it
//! against the document both ways.

use std::sync::{Mutex, OnceLock};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::controller::ApiController;
use crate::error::ApiError;
use crate::http::{Method, Request, Response};
use crate::metrics::Metrics;
use crate::types::*;

/// Path parameters, in pattern order (`{drive_id}` ...).
pub type Params = Vec<String>;

/// What a handler gives back.
#[derive(Debug)]
pub enum Reply {
    /// 204.
    Empty,
    /// 200 with JSON.
    Json(Value),
    /// 200 with text.
    Text(String, &'static str),
}

type Handler =
    Box<dyn Fn(&mut ApiController, &Params, &[u8]) -> Result<Reply, ApiError> + Send + Sync>;

/// One endpoint.
pub struct Route {
    /// Method.
    pub method: Method,
    /// Path pattern, as in the document (`/drives/{drive_id}`).
    pub path: &'static str,
    /// The document's `operationId`.
    pub operation_id: &'static str,
    /// Definition name of the request body, if the endpoint takes one.
    pub request: Option<&'static str>,
    /// The body may be left out (it then means the definition's defaults).
    pub optional_body: bool,
    /// Definition name (or inline description) of the 200 body, if any.
    pub response: Option<&'static str>,
    /// Metric name: counted as `<group>.<metric>_count` / `_fails`.
    pub metric: &'static str,
    handler: Handler,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method.as_str(), self.path)
    }
}

fn get<R: Serialize + Schema + 'static>(
    path: &'static str,
    operation_id: &'static str,
    metric: &'static str,
    h: fn(&mut ApiController) -> Result<R, ApiError>,
) -> Route {
    Route {
        method: Method::Get,
        path,
        operation_id,
        request: None,
        optional_body: false,
        response: Some(R::NAME),
        metric,
        handler: Box::new(move |c, _, _| {
            let r = h(c)?;
            serde_json::to_value(&r)
                .map(Reply::Json)
                .map_err(|e| ApiError::Internal(e.to_string()))
        }),
    }
}

/// A request body as `T`, refused in Firecracker's words.
fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// A PUT or PATCH whose body decodes to `T`. With `id_field`, the path's single parameter
/// must be a valid id equal to that field of the body.
fn write<T: DeserializeOwned + Schema + 'static>(
    method: Method,
    path: &'static str,
    operation_id: &'static str,
    metric: &'static str,
    id_field: Option<fn(&T) -> &str>,
    h: fn(&mut ApiController, T) -> Result<(), ApiError>,
) -> Route {
    Route {
        method,
        path,
        operation_id,
        request: Some(T::NAME),
        optional_body: false,
        response: None,
        metric,
        handler: Box::new(move |c, params, body| {
            let id = params.first().map(String::as_str).unwrap_or("");
            if id_field.is_some() {
                check_id(id)?;
            }
            let value: T = decode(body)?;
            if let Some(field) = id_field {
                if field(&value) != id {
                    return Err(ApiError::bad(
                        "The id from the path does not match the id from the body!",
                    ));
                }
            }
            h(c, value)?;
            Ok(Reply::Empty)
        }),
    }
}

fn put<T: DeserializeOwned + Schema + 'static>(
    path: &'static str,
    operation_id: &'static str,
    metric: &'static str,
    h: fn(&mut ApiController, T) -> Result<(), ApiError>,
) -> Route {
    write(Method::Put, path, operation_id, metric, None, h)
}

fn patch<T: DeserializeOwned + Schema + 'static>(
    path: &'static str,
    operation_id: &'static str,
    metric: &'static str,
    h: fn(&mut ApiController, T) -> Result<(), ApiError>,
) -> Route {
    write(Method::Patch, path, operation_id, metric, None, h)
}

/// A PATCH whose body may be left out (or empty) for `T`'s defaults.
fn patch_or_default<T: DeserializeOwned + Default + Schema + 'static>(
    path: &'static str,
    operation_id: &'static str,
    metric: &'static str,
    h: fn(&mut ApiController, T) -> Result<(), ApiError>,
) -> Route {
    let mut r = write(Method::Patch, path, operation_id, metric, None, h);
    r.optional_body = true;
    r.handler = Box::new(move |c, _, body| {
        let value = if body.iter().all(u8::is_ascii_whitespace) {
            T::default()
        } else {
            decode(body)?
        };
        h(c, value)?;
        Ok(Reply::Empty)
    });
    r
}

/// A PATCH that is a command: takes no body (Firecracker ignores one).
fn patch_command(
    path: &'static str,
    operation_id: &'static str,
    metric: &'static str,
    h: fn(&mut ApiController) -> Result<(), ApiError>,
) -> Route {
    Route {
        method: Method::Patch,
        path,
        operation_id,
        request: None,
        optional_body: false,
        response: None,
        metric,
        handler: Box::new(move |c, _, _| {
            h(c)?;
            Ok(Reply::Empty)
        }),
    }
}

/// A bodiless DELETE of the resource the path's single parameter names (a valid id), as
/// Firecracker's hot-unplug.
fn delete(
    path: &'static str,
    operation_id: &'static str,
    metric: &'static str,
    h: fn(&mut ApiController, String) -> Result<(), ApiError>,
) -> Route {
    Route {
        method: Method::Delete,
        path,
        operation_id,
        request: None,
        optional_body: false,
        response: None,
        metric,
        handler: Box::new(move |c, params, _| {
            let id = params.first().map(String::as_str).unwrap_or("");
            check_id(id)?;
            h(c, id.to_string())?;
            Ok(Reply::Empty)
        }),
    }
}

/// Firecracker's id rule: non-empty, alphanumeric or `_`.
pub fn check_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::bad("The ID cannot be empty."));
    }
    if !id.chars().all(|c| c == '_' || c.is_alphanumeric()) {
        return Err(ApiError::bad(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ));
    }
    Ok(())
}

fn build() -> Vec<Route> {
    use Method::{Patch, Put};
    vec![
        get("/", "describeInstance", "instance_info", |c| {
            Ok(c.instance_info())
        }),
        get("/version", "getFirecrackerVersion", "vmm_version", |c| {
            Ok(c.version())
        }),
        get(
            "/machine-config",
            "getMachineConfiguration",
            "machine_cfg",
            |c| Ok(c.machine_config()),
        ),
        put::<MachineConfig>(
            "/machine-config",
            "putMachineConfiguration",
            "machine_cfg",
            |c, b| c.put_machine_config(b),
        ),
        patch::<MachineConfigUpdate>(
            "/machine-config",
            "patchMachineConfiguration",
            "machine_cfg",
            |c, b| c.patch_machine_config(b),
        ),
        put::<BootSource>(
            "/boot-source",
            "putGuestBootSource",
            "boot_source",
            |c, b| c.put_boot_source(b),
        ),
        write::<Drive>(
            Put,
            "/drives/{drive_id}",
            "putGuestDriveByID",
            "drive",
            Some(|d| &d.drive_id),
            |c, b| c.put_drive(b),
        ),
        write::<PartialDrive>(
            Patch,
            "/drives/{drive_id}",
            "patchGuestDriveByID",
            "drive",
            Some(|d| &d.drive_id),
            |c, b| c.patch_drive(b),
        ),
        delete(
            "/drives/{drive_id}",
            "deleteGuestDriveByID",
            "drive",
            |c, id| c.unplug_device(PluggedDevice::Drive(id)),
        ),
        write::<NetworkInterface>(
            Put,
            "/network-interfaces/{iface_id}",
            "putGuestNetworkInterfaceByID",
            "network",
            Some(|n| &n.iface_id),
            |c, b| c.put_network_interface(b),
        ),
        write::<PartialNetworkInterface>(
            Patch,
            "/network-interfaces/{iface_id}",
            "patchGuestNetworkInterfaceByID",
            "network",
            Some(|n| &n.iface_id),
            |c, b| c.patch_network_interface(b),
        ),
        delete(
            "/network-interfaces/{iface_id}",
            "deleteGuestNetworkInterfaceByID",
            "network",
            |c, id| c.unplug_device(PluggedDevice::NetworkInterface(id)),
        ),
        write::<Pmem>(
            Put,
            "/pmem/{id}",
            "putGuestPmemByID",
            "pmem",
            Some(|p| &p.id),
            |c, b| c.put_pmem(b),
        ),
        write::<PartialPmem>(
            Patch,
            "/pmem/{id}",
            "patchGuestPmemByID",
            "pmem",
            Some(|p| &p.id),
            |c, b| c.patch_pmem(b),
        ),
        delete("/pmem/{id}", "deleteGuestPmemByID", "pmem", |c, id| {
            c.unplug_device(PluggedDevice::Pmem(id))
        }),
        put::<Vsock>("/vsock", "putGuestVsock", "vsock", |c, b| c.put_vsock(b)),
        put::<EntropyDevice>("/entropy", "putEntropyDevice", "entropy", |c, b| {
            c.put_entropy(b)
        }),
        put::<SerialDevice>("/serial", "putSerialDevice", "serial", |c, b| {
            c.put_serial(b)
        }),
        get("/balloon", "describeBalloonConfig", "balloon", |c| {
            c.get_balloon()
        }),
        put::<Balloon>("/balloon", "putBalloon", "balloon", |c, b| c.put_balloon(b)),
        patch::<BalloonUpdate>("/balloon", "patchBalloon", "balloon", |c, b| {
            c.patch_balloon(b)
        }),
        get(
            "/balloon/statistics",
            "describeBalloonStats",
            "balloon_stats",
            |c| c.balloon_stats(),
        ),
        patch::<BalloonStatsUpdate>(
            "/balloon/statistics",
            "patchBalloonStatsInterval",
            "balloon_stats",
            |c, b| c.patch_balloon_stats(b),
        ),
        patch_or_default::<BalloonStartCmd>(
            "/balloon/hinting/start",
            "startBalloonHinting",
            "balloon",
            |c, b| c.balloon_hinting_start(b),
        ),
        get(
            "/balloon/hinting/status",
            "describeBalloonHinting",
            "balloon",
            |c| c.balloon_hinting_status(),
        ),
        patch_command(
            "/balloon/hinting/stop",
            "stopBalloonHinting",
            "balloon",
            |c| c.balloon_hinting_stop(),
        ),
        get(
            "/hotplug/memory",
            "getMemoryHotplug",
            "hotplug_memory",
            |c| c.get_memory_hotplug(),
        ),
        put::<MemoryHotplugConfig>(
            "/hotplug/memory",
            "putMemoryHotplug",
            "hotplug_memory",
            |c, b| c.put_memory_hotplug(b),
        ),
        patch::<MemoryHotplugSizeUpdate>(
            "/hotplug/memory",
            "patchMemoryHotplug",
            "hotplug_memory",
            |c, b| c.patch_memory_hotplug(b),
        ),
        put::<InstanceActionInfo>("/actions", "createSyncAction", "actions", |c, b| {
            c.action(b)
        }),
        patch::<Vm>("/vm", "patchVm", "vmm", |c, b| c.patch_vm(b)),
        put::<SnapshotCreateParams>(
            "/snapshot/create",
            "createSnapshot",
            "snapshot_create",
            |c, b| c.snapshot_create(b),
        ),
        put::<SnapshotLoadParams>("/snapshot/load", "loadSnapshot", "snapshot_load", |c, b| {
            c.snapshot_load(b)
        }),
        put::<Logger>("/logger", "putLogger", "logger", |c, b| c.put_logger(b)),
        put::<MetricsConfig>("/metrics", "putMetrics", "metrics", |c, b| c.put_metrics(b)),
        get::<Value>("/mmds", "getMmds", "mmds", |c| Ok(c.mmds().get())),
        put::<Value>("/mmds", "putMmds", "mmds", |c, b| c.mmds().put(b)),
        patch::<Value>("/mmds", "patchMmds", "mmds", |c, b| c.mmds().patch(b)),
        put::<MmdsConfig>("/mmds/config", "putMmdsConfig", "mmds_config", |c, b| {
            c.put_mmds_config(b)
        }),
        put::<CpuConfig>("/cpu-config", "putCpuConfiguration", "cpu_cfg", |c, b| {
            c.put_cpu_config(b)
        }),
        get("/vm/config", "getExportVmConfig", "vm_config", |c| {
            let v = serde_json::to_value(c.vm_config())
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            Ok(crate::fcconfig::export(v))
        }),
        Route {
            method: Method::Get,
            path: "/vessel/metrics",
            operation_id: "getPrometheusMetrics",
            request: None,
            optional_body: false,
            response: Some("text/plain"),
            metric: "prometheus",
            handler: Box::new(|c, _, _| {
                Ok(Reply::Text(c.prometheus(), "text/plain; version=0.0.4"))
            }),
        },
        put::<CloudInitSeed>(
            "/vessel/cloud-init",
            "putCloudInit",
            "cloud_init",
            |c, b| c.put_cloud_init(b),
        ),
        write::<FsDevice>(
            Put,
            "/vessel/fs/{id}",
            "putFsDevice",
            "fs",
            Some(|f| &f.id),
            |c, b| c.put_fs(b),
        ),
        Route {
            method: Method::Put,
            path: "/vessel/stop",
            operation_id: "stopVm",
            request: None,
            optional_body: false,
            response: None,
            metric: "stop",
            handler: Box::new(|c, _, _| {
                c.stop()?;
                Ok(Reply::Empty)
            }),
        },
        Route {
            method: Method::Put,
            path: "/vessel/migrate",
            operation_id: "migrateVm",
            request: Some(MigrateParams::NAME),
            optional_body: false,
            response: Some("MigrationStats"),
            metric: "migrate",
            handler: Box::new(|c, _, body| {
                let p: MigrateParams = decode(body)?;
                Ok(Reply::Json(c.migrate(p)?))
            }),
        },
    ]
}

/// The route table (built once).
pub fn table() -> &'static [Route] {
    static TABLE: OnceLock<Vec<Route>> = OnceLock::new();
    TABLE.get_or_init(build)
}

/// Matches `path` against a pattern, collecting `{param}` segments.
fn match_path(pattern: &str, path: &str) -> Option<Params> {
    let mut params = Vec::new();
    let mut p = pattern.split('/').filter(|s| !s.is_empty());
    let mut s = path.split('/').filter(|s| !s.is_empty());
    loop {
        match (p.next(), s.next()) {
            (None, None) => return Some(params),
            (Some(pat), Some(seg)) if pat.starts_with('{') => params.push(seg.to_string()),
            (Some(pat), Some(seg)) if pat == seg => {}
            _ => return None,
        }
    }
}

/// Finds the route of a request: its index and path parameters.
pub fn find(method: &Method, path: &str) -> Option<(usize, Params)> {
    table().iter().enumerate().find_map(|(i, r)| {
        if &r.method != method {
            return None;
        }
        match_path(r.path, path).map(|p| (i, p))
    })
}

fn error_response(e: &ApiError) -> Response {
    Response::fault(e.status(), e.to_string())
}

/// Answers one request: routing, Firecracker's body rules, the handler, metrics.
pub fn dispatch(controller: &Mutex<ApiController>, metrics: &Metrics, req: &Request) -> Response {
    let path = req.path();
    log::info!("The API server received a {}.", describe(req, path));
    let response = route(controller, metrics, req, path);
    // Refused requests are logged: 4xx as warnings (the client's doing), 5xx as errors.
    if response.status >= 400 {
        let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        let msg = body["fault_message"].as_str().unwrap_or("");
        let status = response.status;
        let reason = crate::http::reason(status);
        if status >= 500 {
            log::error!("Received Error. Status code: {status} {reason}. Message: {msg}");
        } else {
            log::warn!("Received Error. Status code: {status} {reason}. Message: {msg}");
        }
    }
    response
}

/// A request as Firecracker's log lines describe it: `Put request on "/drives/root" with body
/// "{...}"` (the body quoted and escaped as a Rust string), never the body of `/mmds` (which
/// may hold secrets) and the body of `/cpu-config` (large) only at Debug.
fn describe(req: &Request, path: &str) -> String {
    let method = match &req.method {
        Method::Get => "Get",
        Method::Put => "Put",
        Method::Patch => "Patch",
        Method::Delete => "Delete",
        Method::Other(m) => m.as_str(),
    };
    let plain = format!("{method} request on {path:?}");
    if req.body.is_empty() || path == "/mmds" {
        return plain;
    }
    if path == "/cpu-config" && !log::log_enabled!(log::Level::Debug) {
        return format!(
            "{plain}. To view the CPU template received by the API, configure log-level to DEBUG"
        );
    }
    let body = std::str::from_utf8(&req.body).unwrap_or("inconvertible to UTF-8");
    format!("{plain} with body {body:?}")
}

fn route(
    controller: &Mutex<ApiController>,
    metrics: &Metrics,
    req: &Request,
    path: &str,
) -> Response {
    let Some((index, params)) = find(&req.method, path) else {
        metrics.server.unknown_routes.inc();
        // A known path whose id segment is missing (`PUT /drives`) gets the id error.
        let id_missing = table().iter().any(|r| {
            r.method == req.method
                && r.path.contains('{')
                && match_path(r.path.rsplit_once('/').map_or(r.path, |(a, _)| a), path).is_some()
        });
        let msg = if id_missing {
            "The ID cannot be empty.".to_string()
        } else {
            format!(
                "Invalid request method and/or path: {} {}.",
                req.method.as_str(),
                path
            )
        };
        return Response::fault(400, msg);
    };
    let route = &table()[index];
    let counters = metrics.route(index);
    if let Some(c) = counters {
        c.count.inc();
    }
    let body_err = match (&route.method, route.request.is_some(), req.body.is_empty()) {
        (Method::Get, _, false) => Some("GET request cannot have a body."),
        (Method::Put, true, true) => Some("Empty PUT request."),
        (Method::Patch, true, true) if !route.optional_body => Some("Empty PATCH request."),
        // Firecracker's words for a DELETE with a body.
        (Method::Delete, _, false) => Some("Empty Delete request."),
        _ => None,
    };
    let result = match body_err {
        Some(msg) => Err(ApiError::bad(msg)),
        None => {
            let mut c = controller.lock().unwrap_or_else(|e| e.into_inner());
            (route.handler)(&mut c, &params, &req.body)
        }
    };
    let mut response = match result {
        Ok(Reply::Empty) => Response::no_content(),
        Ok(Reply::Json(v)) => Response::json(&v),
        Ok(Reply::Text(t, ct)) => Response::text(t, ct),
        Err(e) => {
            if let Some(c) = counters {
                c.fails.inc();
            }
            error_response(&e)
        }
    };
    if let Some(msg) = deprecation(&req.method, route.path, &req.body) {
        log::warn!("{msg}");
        metrics.server.deprecated_calls.inc();
        response.deprecated = true;
    }
    response
}

/// Firecracker's deprecated fields (its v1.16 list): a request using one is served, and
/// answered with `Deprecation: true`, a warning and a count.
fn deprecation(method: &Method, path: &str, body: &[u8]) -> Option<&'static str> {
    // Only these routes have deprecated fields: no other body is parsed a second time.
    if !matches!(
        (method, path),
        (Method::Put | Method::Patch, "/machine-config")
            | (Method::Put, "/mmds/config" | "/snapshot/load" | "/vsock")
    ) {
        return None;
    }
    let body: Value = serde_json::from_slice(body).ok()?;
    let has = |field: &str| body.get(field).is_some_and(|v| !v.is_null());
    match (method, path) {
        (Method::Put, "/machine-config") if has("cpu_template") => {
            Some("PUT /machine-config: cpu_template field is deprecated.")
        }
        (Method::Patch, "/machine-config") if has("cpu_template") => {
            Some("PATCH /machine-config: cpu_template field is deprecated.")
        }
        (Method::Put, "/mmds/config") if body.get("version").and_then(Value::as_str) != Some("V2") => {
            Some("PUT /mmds/config: V1 is deprecated. Use V2 instead.")
        }
        (Method::Put, "/snapshot/load")
            if has("mem_file_path") || body.get("enable_diff_snapshots") == Some(&Value::Bool(true)) =>
        {
            Some("PUT /snapshot/load: mem_file_path and enable_diff_snapshots fields are deprecated.")
        }
        (Method::Put, "/vsock") if has("vsock_id") => Some("PUT /vsock: vsock_id field is deprecated."),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_with_parameters() {
        assert_eq!(
            match_path("/drives/{drive_id}", "/drives/rootfs"),
            Some(vec!["rootfs".into()])
        );
        assert_eq!(match_path("/drives/{drive_id}", "/drives/"), None);
        assert_eq!(match_path("/", "/"), Some(vec![]));
        assert_eq!(match_path("/vm/config", "/vm/config/"), Some(vec![]));
        assert_eq!(match_path("/vm", "/vm/config"), None);
        assert!(find(&Method::Patch, "/vm").is_some());
        assert!(find(&Method::Get, "/vm").is_none());
    }

    #[test]
    fn table_has_no_duplicates() {
        let t = table();
        for (i, a) in t.iter().enumerate() {
            for b in &t[i + 1..] {
                assert!(
                    !(a.method == b.method && a.path == b.path),
                    "{a:?} declared twice"
                );
                assert_ne!(a.operation_id, b.operation_id);
            }
        }
    }

    #[test]
    fn deletes_are_routed_by_id_and_counted_with_their_put() {
        for (path, param) in [
            ("/drives/d1", "d1"),
            ("/network-interfaces/eth1", "eth1"),
            ("/pmem/p1", "p1"),
        ] {
            let (i, params) = find(&Method::Delete, path).unwrap();
            assert_eq!(params, [param]);
            let (put, _) = find(&Method::Put, path).unwrap();
            assert_eq!(table()[i].metric, table()[put].metric, "{path}");
            assert_eq!((table()[i].request, table()[i].response), (None, None));
        }
        assert!(find(&Method::Delete, "/balloon").is_none());
        assert!(find(&Method::Delete, "/drives").is_none());
    }

    #[test]
    fn ids_follow_firecracker_rules() {
        assert!(check_id("rootfs_1").is_ok());
        assert_eq!(check_id(""), Err(ApiError::bad("The ID cannot be empty.")));
        assert!(check_id("a-b").is_err());
        assert!(check_id("a/b").is_err());
    }
}
