//! `vessel migrate ...`: live migration for people. `receive` waits for a VM from another
//! Vessel process and runs it to its end; `send` asks a running VMM (through its API
//! socket) to migrate its VM to such a receiver.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use vessel_vmm::migration::{receive, Connection, MigrationUrl};
use vessel_vmm::SerialTarget;

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

/// Why a migration command failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateCliError {
    /// `receive`: nothing could be accepted on the listening address.
    #[error("{listen:?}")]
    Accept {
        /// The address listened on.
        listen: MigrationUrl,
        /// Why accepting failed.
        #[source]
        source: std::io::Error,
    },
    /// Receiving or running the VM failed.
    #[error(transparent)]
    Vmm(#[from] vessel_vmm::VmmError),
    /// `send`: the sending VMM's API could not be asked.
    #[error("{}", .sock.display())]
    Api {
        /// The sending VMM's API socket.
        sock: PathBuf,
        /// What went wrong on it.
        #[source]
        source: std::io::Error,
    },
}

pub fn run(cmd: MigrateCommand) -> Result<ExitCode, MigrateCliError> {
    match cmd {
        MigrateCommand::Receive { listen, serial } => {
            let conn = Connection::accept(&listen).map_err(|source| MigrateCliError::Accept {
                listen: listen.clone(),
                source,
            })?;
            let incoming = receive(conn, serial)?;
            eprintln!(
                "vessel: received the VM ({} MiB on the wire)",
                incoming.bytes >> 20
            );
            let outcome = incoming.start().and_then(|r| r.wait())?;
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
                .map_err(|source| MigrateCliError::Api {
                    sock: api_sock.clone(),
                    source,
                })?;
            println!("{}", r.text());
            Ok(if r.status < 300 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
