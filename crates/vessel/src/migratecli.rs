//! `vessel migrate ...`: live migration for people. `receive` waits for a VM from another
//! Vessel process and runs it to its end; `send` asks a running VMM (through its API
//! socket) to migrate its VM to such a receiver.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use vessel_vmm::migration::{receive, Connection, MigrationUrl};
use vessel_vmm::{ErrorChain, SerialTarget};

#[derive(Subcommand)]
pub enum MigrateCommand {
    /// Wait for a VM on ADDRESS (unix:PATH or tcp:HOST:PORT), then run it until it ends.
    Receive {
        /// Where to listen.
        #[arg(long)]
        listen: MigrationUrl,
        /// Where the console goes (default: the sender's target).
        #[arg(long)]
        serial: Option<SerialTarget>,
    },
    /// Have the VMM serving API_SOCK migrate its VM to a receiver.
    Send {
        /// The source VMM's API socket.
        #[arg(long)]
        api_sock: PathBuf,
        /// The receiver's address (unix:PATH or tcp:HOST:PORT).
        #[arg(long)]
        to: String,
        /// The longest pause the guest should see, in milliseconds.
        #[arg(long, default_value_t = 10)]
        downtime_ms: u64,
    },
}

pub fn run(cmd: MigrateCommand) -> Result<ExitCode, String> {
    match cmd {
        MigrateCommand::Receive { listen, serial } => {
            let conn = Connection::accept(&listen).map_err(|e| format!("{listen:?}: {e}"))?;
            let incoming = receive(conn, serial).map_err(|e| ErrorChain(&e).to_string())?;
            eprintln!(
                "vessel: received the VM ({} MiB on the wire)",
                incoming.bytes >> 20
            );
            let outcome = incoming
                .start()
                .and_then(|r| r.wait())
                .map_err(|e| ErrorChain(&e).to_string())?;
            eprintln!("vessel: the migrated VM ended: {:?}", outcome.reason);
            Ok(ExitCode::SUCCESS)
        }
        MigrateCommand::Send {
            api_sock,
            to,
            downtime_ms,
        } => {
            let mut c = vessel_api::client::Client::new(&api_sock, Duration::from_secs(600));
            let body = serde_json::json!({ "destination": to, "downtime_ms": downtime_ms });
            let r = c
                .request("PUT", "/vessel/migrate", Some(&body.to_string()))
                .map_err(|e| format!("{}: {e}", api_sock.display()))?;
            println!("{}", r.text());
            Ok(if r.status < 300 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
