//! `vessel snapshot ...`: snapshot files for people. `restore` runs a VM from a snapshot to
//! its end, as `vessel run` does a fresh one; `rebase` merges a diff memory file onto a full
//! one; `inspect` checks a state file and prints what it holds.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use vessel_vmm::restore::{load_state, restore, RestoreRequest, WorkingSet};
use vessel_vmm::snapshot::NoApi;
use vessel_vmm::SerialTarget;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Restore a VM from a snapshot and run it until it ends.
    Restore {
        /// The state file.
        #[arg(long)]
        state: PathBuf,
        /// The memory file (full, or a diff rebased onto its full file).
        #[arg(long)]
        mem: PathBuf,
        /// Where the console goes (default: the snapshot's own target).
        #[arg(long)]
        serial: Option<SerialTarget>,
        /// Working-set file: prefetched if it exists, else recorded for next time.
        #[arg(long)]
        working_set: Option<PathBuf>,
        /// How long after the restore the working set is recorded, in milliseconds.
        #[arg(long, default_value_t = 100)]
        record_ms: u64,
    },
    /// Copy the pages of a diff memory file onto the full memory file it follows.
    Rebase {
        /// The full memory file, updated in place.
        #[arg(long)]
        base: PathBuf,
        /// The diff memory file.
        #[arg(long)]
        diff: PathBuf,
    },
    /// Check a state file and print a summary of it.
    Inspect {
        /// The state file.
        state: PathBuf,
    },
}

/// Why a snapshot command failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotCliError {
    /// Restoring or running the VM failed.
    #[error(transparent)]
    Vmm(#[from] vessel_vmm::VmmError),
    /// A snapshot file could not be read or written.
    #[error(transparent)]
    Snapshot(#[from] vessel_snapshot::format::SnapshotError),
}

pub fn run(cmd: SnapshotCommand) -> Result<ExitCode, SnapshotCliError> {
    match cmd {
        SnapshotCommand::Restore {
            state,
            mem,
            serial,
            working_set,
            record_ms,
        } => {
            let req = RestoreRequest {
                state,
                memory: mem,
                serial,
                track_dirty_pages: None,
                working_set: working_set.map(|path| WorkingSet {
                    path,
                    record_after: std::time::Duration::from_millis(record_ms),
                }),
            };
            let (vm, _) = restore(&req)?;
            let outcome = vm.start().and_then(|r| r.wait())?;
            eprintln!("vessel: the restored VM ended: {:?}", outcome.reason);
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Rebase { base, diff } => {
            let n = vessel_snapshot::memory::rebase(&base, &diff)?;
            println!(
                "copied {n} bytes from {} onto {}",
                diff.display(),
                base.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Inspect { state } => {
            let s = load_state::<NoApi>(&state)?;
            println!("vessel version: {}", s.vessel_version);
            println!("vcpus: {}", s.vcpus.len());
            let mem: u64 = s.memory.iter().map(|r| r.size).sum();
            println!("memory: {} MiB in {} regions", mem >> 20, s.memory.len());
            for (i, v) in s.vcpus.iter().enumerate() {
                println!("vcpu {i}: rip {:#x}", v.regs.rip);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
