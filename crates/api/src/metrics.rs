//! API metrics: per-route request and failure counters (named after the route table's
//! `metric`, as Firecracker's `put_api_requests.drive_count` ...), HTTP-level counters, the
//! Firecracker-style JSON line (deltas since the previous flush) and a Prometheus rendering
//! (cumulative).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::fcmetrics;
use crate::http::Method;
use crate::routes;

/// A monotonically increasing counter that also remembers what was last flushed.
#[derive(Debug, Default)]
pub struct Counter {
    value: AtomicU64,
    flushed: AtomicU64,
}

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.value.fetch_add(1, Ordering::Relaxed);
    }
    /// The cumulative count.
    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
    /// The count since the previous call.
    pub fn take_delta(&self) -> u64 {
        let v = self.get();
        v.saturating_sub(self.flushed.swap(v, Ordering::Relaxed))
    }
}

/// Per-route counters.
#[derive(Debug, Default)]
pub struct RouteCounters {
    /// Requests routed here.
    pub count: Counter,
    /// Requests that failed (4xx/5xx).
    pub fails: Counter,
}

/// HTTP-level counters of the server.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Connections accepted.
    pub connections: Counter,
    /// Connections refused because too many were open.
    pub connections_refused: Counter,
    /// Requests that could not be parsed (400).
    pub bad_requests: Counter,
    /// Bodies over the limit (413).
    pub payload_too_large: Counter,
    /// Clients that stalled mid-request (408).
    pub timeouts: Counter,
    /// Method/path pairs matching no route.
    pub unknown_routes: Counter,
    /// Requests that used a deprecated endpoint or field (Firecracker's
    /// `deprecated_api.deprecated_http_api_calls`).
    pub deprecated_calls: Counter,
    /// Firecracker's `process_startup_time_us`: process start to the API socket listening
    /// (a gauge, repeated in every line; 0 until set).
    pub process_startup_time_us: AtomicU64,
    /// Firecracker's `process_startup_time_cpu_us`: the CPU time spent until then.
    pub process_startup_time_cpu_us: AtomicU64,
}

impl ServerCounters {
    /// Records how long the process took to serve its API, in wall and CPU microseconds.
    pub fn set_process_startup(&self, wall_us: u64, cpu_us: u64) {
        self.process_startup_time_us
            .store(wall_us, Ordering::Relaxed);
        self.process_startup_time_cpu_us
            .store(cpu_us, Ordering::Relaxed);
    }
}

/// The signals Firecracker intercepts, as its `signals` group (and `seccomp.num_faults` for
/// SIGSYS) counts them. Written from signal handlers: plain atomics only.
#[derive(Debug, Default)]
pub struct SignalCounters {
    /// The process is going down after one of these (set to 1, as Firecracker stores it).
    fatal: [AtomicU64; 7],
    /// SIGPIPE, which the process survives (a count since the previous line).
    pub sigpipe: Counter,
}

/// The fatal signals' names in the metrics, indexed as [`SignalCounters`] keeps them; SIGSYS
/// is `seccomp.num_faults`.
const FATAL_SIGNALS: [(i32, &str, &str); 7] = [
    (libc::SIGBUS, "signals", "sigbus"),
    (libc::SIGSEGV, "signals", "sigsegv"),
    (libc::SIGXFSZ, "signals", "sigxfsz"),
    (libc::SIGXCPU, "signals", "sigxcpu"),
    (libc::SIGHUP, "signals", "sighup"),
    (libc::SIGILL, "signals", "sigill"),
    (libc::SIGSYS, "seccomp", "num_faults"),
];

impl SignalCounters {
    /// Records that fatal signal `signo` was intercepted (async-signal-safe). Other signals
    /// are ignored.
    pub fn record_fatal(&self, signo: i32) {
        if let Some(i) = FATAL_SIGNALS.iter().position(|(s, _, _)| *s == signo) {
            self.fatal[i].store(1, Ordering::SeqCst);
        }
    }

    fn fill(&self, line: &mut Map<String, Value>) {
        for (i, (_, group, name)) in FATAL_SIGNALS.iter().enumerate() {
            let v = self.fatal[i].load(Ordering::SeqCst);
            if v != 0 {
                fcmetrics::fill(line, group, name, &v.into());
            }
        }
        fcmetrics::fill(
            line,
            "signals",
            "sigpipe",
            &self.sigpipe.take_delta().into(),
        );
    }
}

/// All API metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Indexed like [`routes::table`].
    pub routes: Vec<RouteCounters>,
    /// Server counters.
    pub server: ServerCounters,
    /// Intercepted signals.
    pub signals: SignalCounters,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn group_name(m: &Method) -> &'static str {
    match m {
        Method::Get => "get_api_requests",
        Method::Put => "put_api_requests",
        Method::Patch => "patch_api_requests",
        // Firecracker's schema has no such group: DELETEs show in `GET /vessel/metrics` only.
        Method::Delete => "delete_api_requests",
        Method::Other(_) => "other_api_requests",
    }
}

impl Metrics {
    /// Zeroed counters for every route.
    pub fn new() -> Self {
        Self {
            routes: routes::table()
                .iter()
                .map(|_| RouteCounters::default())
                .collect(),
            server: ServerCounters::default(),
            signals: SignalCounters::default(),
        }
    }

    /// Counters of route number `index`.
    pub fn route(&self, index: usize) -> Option<&RouteCounters> {
        self.routes.get(index)
    }

    /// One metrics line in Firecracker's schema ([`crate::fcmetrics`]): `utc_timestamp_ms`
    /// and every group of Firecracker's, with `api_server`'s startup gauges, the
    /// `get/put/patch_api_requests` counters Firecracker has (`<metric>_count`/`_fails`,
    /// counts since the previous line), `deprecated_api`, and the fields of the VMM's `extra`
    /// groups that the schema has; zeros elsewhere. `id` and `properties` only when asked
    /// (Vessel extensions of `PUT /metrics`).
    pub fn json_line(
        &self,
        id: Option<&str>,
        properties: Option<&BTreeMap<String, String>>,
        extra: Map<String, Value>,
    ) -> Value {
        let mut out = Map::new();
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        out.insert("utc_timestamp_ms".into(), ts.into());
        if let Some(id) = id {
            out.insert("id".into(), id.into());
        }
        if let Some(p) = properties {
            out.insert(
                "properties".into(),
                Value::Object(
                    p.iter()
                        .map(|(k, v)| (k.clone(), v.clone().into()))
                        .collect(),
                ),
            );
        }
        let mut line = fcmetrics::skeleton();
        let s = &self.server;
        for (name, g) in [
            ("process_startup_time_us", &s.process_startup_time_us),
            (
                "process_startup_time_cpu_us",
                &s.process_startup_time_cpu_us,
            ),
        ] {
            fcmetrics::fill(
                &mut line,
                "api_server",
                name,
                &g.load(Ordering::Relaxed).into(),
            );
        }
        fcmetrics::fill(
            &mut line,
            "deprecated_api",
            "deprecated_http_api_calls",
            &s.deprecated_calls.take_delta().into(),
        );
        for (route, c) in routes::table().iter().zip(&self.routes) {
            let group = group_name(&route.method);
            let (dc, df) = (c.count.take_delta(), c.fails.take_delta());
            for (key, d) in [
                (format!("{}_count", route.metric), dc),
                (format!("{}_fails", route.metric), df),
            ] {
                let prev = line
                    .get(group)
                    .and_then(|g| g.get(&key))
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                fcmetrics::fill(&mut line, group, &key, &(prev + d).into());
            }
        }
        for (group, fields) in extra {
            if let Value::Object(fields) = fields {
                for (k, v) in fields {
                    fcmetrics::fill(&mut line, &group, &k, &v);
                }
            }
        }
        self.signals.fill(&mut line);
        out.extend(line);
        Value::Object(out)
    }

    /// Cumulative counters in the Prometheus text exposition format (0.0.4). Numeric leaves
    /// of the VMM's `extra` groups become `vessel_<group>_<name>` gauges.
    pub fn prometheus(&self, extra: &Map<String, Value>) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP vessel_api_requests_total API requests by method and path."
        );
        let _ = writeln!(o, "# TYPE vessel_api_requests_total counter");
        for (route, c) in routes::table().iter().zip(&self.routes) {
            let _ = writeln!(
                o,
                "vessel_api_requests_total{{method=\"{}\",path=\"{}\"}} {}",
                route.method.as_str(),
                route.path,
                c.count.get()
            );
        }
        let _ = writeln!(
            o,
            "# HELP vessel_api_request_failures_total API requests answered with an error."
        );
        let _ = writeln!(o, "# TYPE vessel_api_request_failures_total counter");
        for (route, c) in routes::table().iter().zip(&self.routes) {
            let _ = writeln!(
                o,
                "vessel_api_request_failures_total{{method=\"{}\",path=\"{}\"}} {}",
                route.method.as_str(),
                route.path,
                c.fails.get()
            );
        }
        let s = &self.server;
        for (name, help, c) in [
            (
                "vessel_api_connections_total",
                "Connections accepted.",
                &s.connections,
            ),
            (
                "vessel_api_connections_refused_total",
                "Connections refused (too many open).",
                &s.connections_refused,
            ),
            (
                "vessel_api_bad_requests_total",
                "Unparseable requests.",
                &s.bad_requests,
            ),
            (
                "vessel_api_payload_too_large_total",
                "Requests over the body limit.",
                &s.payload_too_large,
            ),
            (
                "vessel_api_timeouts_total",
                "Clients that stalled mid-request.",
                &s.timeouts,
            ),
            (
                "vessel_api_unknown_routes_total",
                "Requests matching no route.",
                &s.unknown_routes,
            ),
        ] {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.get()
            );
        }
        for (group, v) in extra {
            if let Value::Object(fields) = v {
                for (k, v) in fields {
                    if let Some(n) = v.as_f64() {
                        let name = format!("vessel_{}_{}", sanitize(group), sanitize(k));
                        let _ = writeln!(o, "# TYPE {name} gauge\n{name} {n}");
                    }
                }
            }
        }
        o
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_gauges_repeat_and_counters_are_deltas() {
        let m = Metrics::new();
        m.server.set_process_startup(7_000, 3_000);
        m.server.connections.inc();
        m.server.deprecated_calls.inc();
        let first = m.json_line(None, None, Map::new());
        let api = &first["api_server"];
        assert_eq!(api["process_startup_time_us"], 7_000);
        assert_eq!(api["process_startup_time_cpu_us"], 3_000);
        // Firecracker's schema has no connection counters (GET /vessel/metrics does).
        assert!(api.get("connections_count").is_none());
        assert_eq!(first["deprecated_api"]["deprecated_http_api_calls"], 1);
        let second = m.json_line(None, None, Map::new());
        assert_eq!(second["api_server"]["process_startup_time_us"], 7_000);
        assert_eq!(second["deprecated_api"]["deprecated_http_api_calls"], 0);
    }

    #[test]
    fn lines_hold_firecracker_s_groups_only() {
        let m = Metrics::new();
        let (i, _) = routes::find(&Method::Put, "/drives/x").unwrap();
        m.routes[i].count.inc();
        m.routes[i].fails.inc();
        let (i, _) = routes::find(&Method::Put, "/balloon").unwrap();
        m.routes[i].count.inc();
        let mut extra = Map::new();
        extra.insert(
            "vcpu".into(),
            serde_json::json!({"exit_io_in": 5, "vessel_only": 1}),
        );
        extra.insert("vessel_vm".into(), serde_json::json!({"uptime_ms": 9}));
        let line = m.json_line(None, None, extra);
        assert_eq!(line["put_api_requests"]["drive_count"], 1);
        assert_eq!(line["put_api_requests"]["drive_fails"], 1);
        assert_eq!(line["vcpu"]["exit_io_in"], 5);
        // Every group is there, with zeros where nothing was counted.
        assert_eq!(line["signals"]["sigbus"], 0);
        assert_eq!(line["memory_hotplug"]["plug_agg"]["max_us"], 0);
        // Nothing outside the schema: no balloon route counter, no Vessel group or field.
        assert!(line["put_api_requests"].get("balloon_count").is_none());
        assert!(line.get("vessel_vm").is_none());
        assert!(line["vcpu"].get("vessel_only").is_none());
        assert!(line.get("other_api_requests").is_none());
        // Prometheus keeps Vessel's own figures.
        let mut extra = Map::new();
        extra.insert("vessel_vm".into(), serde_json::json!({"uptime_ms": 9}));
        assert!(m
            .prometheus(&extra)
            .contains("vessel_vessel_vm_uptime_ms 9"));
    }
}
