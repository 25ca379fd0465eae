//! A `vessel` process in Firecracker mode (`--api-sock`), its console collected as it
//! comes, and short-hands for API calls that assert the status.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vessel_api::client::{Client, ClientResponse};

use super::vessel;

pub struct FcVessel {
    pub child: Child,
    /// The console's input.
    pub stdin: Option<ChildStdin>,
    pub console: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
    pub sock: PathBuf,
}

impl FcVessel {
    /// Starts `vessel --api-sock DIR/NAME.sock` and waits for the socket to accept.
    pub fn start(dir: &Path, name: &str, extra: &[&str]) -> FcVessel {
        let sock = dir.join(format!("{name}.sock"));
        let mut cmd = vessel();
        cmd.arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn vessel");
        let console = super::collect_output(child.stdout.take().unwrap());
        let stderr = super::collect_output(child.stderr.take().unwrap());
        let stdin = child.stdin.take();
        let v = FcVessel {
            child,
            stdin,
            console,
            stderr,
            sock,
        };
        let t = Instant::now();
        // The socket's file appears at bind(), a moment before listen(): wait until it accepts.
        while std::os::unix::net::UnixStream::connect(&v.sock).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no API socket; stderr: {}",
                v.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        v
    }

    pub fn client(&self) -> Client {
        Client::new(&self.sock, Duration::from_secs(60))
    }

    pub fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the console.
    pub fn wait_console(&self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) {
        let t = Instant::now();
        loop {
            if pred(&self.console()) {
                return;
            }
            assert!(
                t.elapsed() < limit,
                "waited {limit:?} for {what}; console:\n{}\nstderr:\n{}",
                tail(&self.console()),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit; returns its status code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "vessel did not exit within {limit:?}; console:\n{}\nstderr:\n{}",
                    tail(&self.console()),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process (as a crash would) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FcVessel {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last 40 lines of `s`.
pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

pub fn call(c: &mut Client, method: &str, path: &str, body: Option<Value>) -> ClientResponse {
    let body = body.map(|b| b.to_string());
    c.request(method, path, body.as_deref())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Calls and asserts the status; returns the body as JSON (Null when empty).
pub fn expect(c: &mut Client, method: &str, path: &str, body: Option<Value>, status: u16) -> Value {
    let r = call(c, method, path, body);
    assert_eq!(r.status, status, "{method} {path}: {}", r.text());
    r.json()
}

/// `PUT /boot-source` then `PUT /machine-config`, each answered 204.
pub fn configure(c: &mut Client, boot_source: Value, machine_config: Value) {
    expect(c, "PUT", "/boot-source", Some(boot_source), 204);
    expect(c, "PUT", "/machine-config", Some(machine_config), 204);
}

pub fn action(kind: &str) -> Option<Value> {
    Some(json!({ "action_type": kind }))
}

/// `GET /`'s state.
pub fn state(c: &mut Client) -> String {
    expect(c, "GET", "/", None, 200)["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
