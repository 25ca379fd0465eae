//! `vessel api --sock PATH COMMAND`: a small client for people, talking to a running VM's
//! API socket (Vessel's or Firecracker's): status, start, pause, resume, ctrl-alt-del,
//! poweroff, snapshot create/load, balloon show/set/stats and free page hinting runs,
//! hotpluggable memory show/set, device hotplug (add-disk/remove-disk, add-net/remove-net, add-pmem/remove-pmem: a `PUT`
//! after boot hot-plugs, a `DELETE` hot-unplugs once the guest has released the device),
//! metrics, and raw get/put/patch/delete.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use vessel_api::client::{Client, ClientResponse};

#[derive(Args)]
pub struct ApiArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    sock: PathBuf,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    command: ApiCommand,
}

#[derive(Subcommand)]
enum ApiCommand {
    /// The instance: id, state, version (GET /).
    Status,
    /// Pause the vCPUs (PATCH /vm Paused).
    Pause,
    /// Resume the vCPUs (PATCH /vm Resumed).
    Resume,
    /// Type Ctrl-Alt-Del on the guest's keyboard (a Linux guest reboots, ending the VM).
    CtrlAltDel,
    /// End the VM: Ctrl-Alt-Del, then, if the VM still runs after the grace period, stop it
    /// (PUT /vessel/stop). Returns once the VM's process has removed its socket.
    Poweroff {
        /// Stop at once, without Ctrl-Alt-Del.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest after Ctrl-Alt-Del.
        #[arg(long, default_value_t = 10)]
        grace: u64,
    },
    /// Snapshots: create (the VM must be paused) or load (on a fresh VMM).
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// The balloon device: show it, set its target size, read its statistics.
    Balloon {
        #[command(subcommand)]
        command: BalloonCommand,
    },
    /// Hotpluggable memory (virtio-mem): show its status, set the size the guest is asked
    /// to plug.
    Memory {
        #[command(subcommand)]
        command: MemoryCommand,
    },
    /// Hot-plug a disk into the running VM (PUT /drives/ID; a virtio-pci block device).
    AddDisk {
        /// The drive's id.
        id: String,
        /// Its backing file.
        path: String,
        /// Attach it read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Hot-unplug a disk (DELETE /drives/ID): the guest is asked to release it.
    RemoveDisk {
        /// The drive's id.
        id: String,
    },
    /// Hot-plug a network interface (PUT /network-interfaces/ID; a virtio-pci net device).
    AddNet {
        /// The interface's id.
        id: String,
        /// The host TAP device.
        tap: String,
        /// The guest's MAC address (xx:xx:xx:xx:xx:xx).
        #[arg(long)]
        mac: Option<String>,
    },
    /// Hot-unplug a network interface (DELETE /network-interfaces/ID).
    RemoveNet {
        /// The interface's id.
        id: String,
    },
    /// Hot-plug a pmem device (PUT /pmem/ID; a virtio-pci pmem device).
    AddPmem {
        /// The device's id.
        id: String,
        /// Its backing file.
        path: String,
        /// Map it read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Hot-unplug a pmem device (DELETE /pmem/ID).
    RemovePmem {
        /// The device's id.
        id: String,
    },
    /// Start the configured VM (InstanceStart).
    Start,
    /// Write a metrics line to the metrics path (FlushMetrics).
    FlushMetrics,
    /// The metrics in the Prometheus text format (GET /vessel/metrics).
    Metrics,
    /// GET PATH.
    Get { path: String },
    /// PUT PATH JSON.
    Put { path: String, json: String },
    /// PATCH PATH JSON.
    Patch { path: String, json: String },
    /// DELETE PATH.
    Delete { path: String },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// PUT /snapshot/create.
    Create {
        /// Where to write guest memory.
        #[arg(long, value_name = "PATH")]
        mem: String,
        /// Where to write the VM state.
        #[arg(long, value_name = "PATH")]
        state: String,
        /// A diff snapshot (pages dirtied since the last one).
        #[arg(long)]
        diff: bool,
    },
    /// PUT /snapshot/load.
    Load {
        /// The guest memory file.
        #[arg(long, value_name = "PATH")]
        mem: String,
        /// The VM state file.
        #[arg(long, value_name = "PATH")]
        state: String,
        /// Resume the VM once loaded.
        #[arg(long)]
        resume: bool,
    },
}

#[derive(Subcommand)]
enum BalloonCommand {
    /// GET /balloon.
    Show,
    /// PATCH /balloon: the balloon's target size in MiB.
    Set { mib: u32 },
    /// GET /balloon/statistics.
    Stats,
    /// PATCH /balloon/hinting/start: a free page hinting run (acknowledged when the driver
    /// stops, unless --no-ack).
    HintStart {
        #[arg(long)]
        no_ack: bool,
    },
    /// GET /balloon/hinting/status.
    HintStatus,
    /// PATCH /balloon/hinting/stop: the driver takes its hinted memory back.
    HintStop,
}

#[derive(Subcommand)]
enum MemoryCommand {
    /// GET /hotplug/memory.
    Show,
    /// PATCH /hotplug/memory: the plugged size to reach, in MiB.
    Set { mib: u64 },
}

/// Why an API command failed (HTTP errors are printed, not returned).
#[derive(Debug, thiserror::Error)]
pub enum ApiCliError {
    /// The request could not be sent or answered.
    #[error("{}", .sock.display())]
    Socket {
        /// The API socket.
        sock: PathBuf,
        /// What went wrong on it.
        #[source]
        source: std::io::Error,
    },
    /// `poweroff`: the VM's process kept running after `PUT /vessel/stop`.
    #[error("{}: the VM's process did not exit after stopping", .sock.display())]
    NotExited {
        /// The API socket.
        sock: PathBuf,
    },
}

fn action(kind: &str) -> String {
    format!("{{\"action_type\": \"{kind}\"}}")
}

pub fn run(args: ApiArgs) -> Result<ExitCode, ApiCliError> {
    let mut client = Client::new(&args.sock, Duration::from_secs(args.timeout));
    let (method, path, body) = match args.command {
        ApiCommand::Poweroff { force, grace } => {
            return poweroff(&mut client, &args.sock, force, Duration::from_secs(grace))
        }
        ApiCommand::Snapshot {
            command: SnapshotCommand::Create { mem, state, diff },
        } => {
            let mut b = serde_json::json!({"mem_file_path": mem, "snapshot_path": state});
            if diff {
                b["snapshot_type"] = "Diff".into();
            }
            ("PUT", "/snapshot/create".into(), Some(b.to_string()))
        }
        ApiCommand::Snapshot {
            command: SnapshotCommand::Load { mem, state, resume },
        } => (
            "PUT",
            "/snapshot/load".into(),
            Some(
                serde_json::json!({
                    "snapshot_path": state,
                    "mem_backend": {"backend_type": "File", "backend_path": mem},
                    "resume_vm": resume
                })
                .to_string(),
            ),
        ),
        ApiCommand::Balloon { command } => match command {
            BalloonCommand::Show => ("GET", "/balloon".into(), None),
            BalloonCommand::Set { mib } => (
                "PATCH",
                "/balloon".into(),
                Some(format!("{{\"amount_mib\": {mib}}}")),
            ),
            BalloonCommand::Stats => ("GET", "/balloon/statistics".into(), None),
            BalloonCommand::HintStart { no_ack } => (
                "PATCH",
                "/balloon/hinting/start".into(),
                Some(format!("{{\"acknowledge_on_stop\": {}}}", !no_ack)),
            ),
            BalloonCommand::HintStatus => ("GET", "/balloon/hinting/status".into(), None),
            BalloonCommand::HintStop => ("PATCH", "/balloon/hinting/stop".into(), None),
        },
        ApiCommand::Memory { command } => match command {
            MemoryCommand::Show => ("GET", "/hotplug/memory".into(), None),
            MemoryCommand::Set { mib } => (
                "PATCH",
                "/hotplug/memory".into(),
                Some(format!("{{\"requested_size_mib\": {mib}}}")),
            ),
        },
        ApiCommand::AddDisk {
            id,
            path,
            read_only,
        } => (
            "PUT",
            format!("/drives/{id}"),
            Some(
                serde_json::json!({
                    "drive_id": id,
                    "path_on_host": path,
                    "is_root_device": false,
                    "is_read_only": read_only
                })
                .to_string(),
            ),
        ),
        ApiCommand::RemoveDisk { id } => ("DELETE", format!("/drives/{id}"), None),
        ApiCommand::AddNet { id, tap, mac } => {
            let mut b = serde_json::json!({"iface_id": id, "host_dev_name": tap});
            if let Some(mac) = mac {
                b["guest_mac"] = mac.into();
            }
            (
                "PUT",
                format!("/network-interfaces/{id}"),
                Some(b.to_string()),
            )
        }
        ApiCommand::RemoveNet { id } => ("DELETE", format!("/network-interfaces/{id}"), None),
        ApiCommand::AddPmem {
            id,
            path,
            read_only,
        } => (
            "PUT",
            format!("/pmem/{id}"),
            Some(
                serde_json::json!({
                    "id": id,
                    "path_on_host": path,
                    "root_device": false,
                    "read_only": read_only
                })
                .to_string(),
            ),
        ),
        ApiCommand::RemovePmem { id } => ("DELETE", format!("/pmem/{id}"), None),
        ApiCommand::Status => ("GET", "/".to_string(), None),
        ApiCommand::Pause => ("PATCH", "/vm".into(), Some(r#"{"state": "Paused"}"#.into())),
        ApiCommand::Resume => (
            "PATCH",
            "/vm".into(),
            Some(r#"{"state": "Resumed"}"#.into()),
        ),
        ApiCommand::CtrlAltDel => ("PUT", "/actions".into(), Some(action("SendCtrlAltDel"))),
        ApiCommand::Start => ("PUT", "/actions".into(), Some(action("InstanceStart"))),
        ApiCommand::FlushMetrics => ("PUT", "/actions".into(), Some(action("FlushMetrics"))),
        ApiCommand::Metrics => ("GET", "/vessel/metrics".into(), None),
        ApiCommand::Get { path } => ("GET", path, None),
        ApiCommand::Put { path, json } => ("PUT", path, Some(json)),
        ApiCommand::Patch { path, json } => ("PATCH", path, Some(json)),
        ApiCommand::Delete { path } => ("DELETE", path, None),
    };
    let r = client
        .request(method, &path, body.as_deref())
        .map_err(|source| ApiCliError::Socket {
            sock: args.sock.clone(),
            source,
        })?;
    print_response(&r);
    Ok(if (200..300).contains(&r.status) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Waits until the socket is gone (the VM's process removed it on exit) or `limit` passes.
fn wait_gone(sock: &Path, limit: Duration) -> bool {
    let t = Instant::now();
    while sock.exists() {
        if t.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn poweroff(
    client: &mut Client,
    sock: &Path,
    force: bool,
    grace: Duration,
) -> Result<ExitCode, ApiCliError> {
    let err = |source| ApiCliError::Socket {
        sock: sock.to_path_buf(),
        source,
    };
    if !force {
        let r = client
            .request("PUT", "/actions", Some(&action("SendCtrlAltDel")))
            .map_err(err)?;
        if (200..300).contains(&r.status) {
            if wait_gone(sock, grace) {
                println!("the microVM powered off");
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!(
                "vessel: the guest did not end within {} s of Ctrl-Alt-Del; stopping it",
                grace.as_secs()
            );
        } else {
            print_response(&r);
        }
    }
    let r = client.request("PUT", "/vessel/stop", None).map_err(err)?;
    if !(200..300).contains(&r.status) {
        print_response(&r);
        return Ok(ExitCode::FAILURE);
    }
    if wait_gone(sock, Duration::from_secs(30)) {
        println!("the microVM stopped");
        Ok(ExitCode::SUCCESS)
    } else {
        Err(ApiCliError::NotExited {
            sock: sock.to_path_buf(),
        })
    }
}

/// Success bodies go to stdout (JSON pretty-printed); errors to stderr with their status.
fn print_response(r: &ClientResponse) {
    let text = match r.json() {
        serde_json::Value::Null => r.text(),
        v => serde_json::to_string_pretty(&v).unwrap_or_else(|_| r.text()),
    };
    if (200..300).contains(&r.status) {
        if !text.is_empty() {
            println!("{text}");
        }
    } else {
        eprintln!("vessel: HTTP {}: {}", r.status, text.trim());
    }
}
