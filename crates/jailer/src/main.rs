//! `vessel-jailer`: Firecracker's jailer flags, for Vessel (or any VMM binary given as
//! `--exec-file`). See the `vessel_jailer` crate for what it does.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "vessel-jailer",
    version,
    about = "Run a VMM in a jail: its own root, namespaces, cgroup limits and an unprivileged uid/gid",
    after_help = "Example: vessel-jailer --id vm1 --exec-file /usr/bin/vessel --uid 1000 --gid 1000 \\\n  --memory 1G --cpus 1 --pids 64 --bind /srv/vmlinux:/vmlinux -- --api-sock /run/api.sock"
)]
struct Cli {
    #[command(flatten)]
    jail: vessel_jailer::JailArgs,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    vessel_jailer::main_with(&cli.jail)
}
