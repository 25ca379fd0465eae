//! `vessel api --sock PATH COMMAND`: a small client for people, talking to a running VM's
//! API socket (Vessel's or Firecracker's).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
}

fn action(kind: &str) -> String {
    format!("{{\"action_type\": \"{kind}\"}}")
}

pub fn run(args: ApiArgs) -> Result<ExitCode, String> {
    let (method, path, body) = match args.command {
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
    };
    let mut client = Client::new(&args.sock, Duration::from_secs(args.timeout));
    let r = client
        .request(method, &path, body.as_deref())
        .map_err(|e| format!("{}: {e}", args.sock.display()))?;
    print_response(&r);
    Ok(if (200..300).contains(&r.status) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
