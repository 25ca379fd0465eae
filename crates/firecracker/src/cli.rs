//! The command line of Firecracker mode, shared by the `vessel` command (which takes it
//! beside its subcommands) and the slim `firecracker` binary (which takes only it): the
//! seccomp flags, the log level, the version text, and the whole of `firecracker`'s `main`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser};
use vessel_vmm::ErrorChain;

use crate::{firecracker, logger};

/// seccomp-bpf filters (every command that starts a VM; Firecracker mode too).
#[derive(Args, Debug, Default)]
pub struct SeccompArgs {
    /// Run without seccomp filters (they are on by default).
    #[arg(long, global = true, conflicts_with_all = ["seccomp_filter", "seccomp_log"])]
    no_seccomp: bool,
    /// Use the filters of this Firecracker-style JSON file (keys vmm, api, vcpu and
    /// optionally virtio-blk, virtio-net, ...) instead of Vessel's.
    #[arg(long, global = true, value_name = "FILE")]
    seccomp_filter: Option<PathBuf>,
    /// Log syscalls outside the filters (kernel log) instead of killing the process.
    #[arg(long, global = true, conflicts_with = "seccomp_filter")]
    seccomp_log: bool,
    /// Firecracker before 1.0: 0 turns the filters off, 1 and 2 leave them on.
    #[arg(long, global = true, hide = true, value_name = "LEVEL")]
    seccomp_level: Option<u8>,
    /// Tests: the first thread of this kind (vmm, api, vcpu, virtio-blk, ...) makes a
    /// forbidden syscall once its filter is on.
    #[arg(long, global = true, hide = true, value_name = "KIND")]
    seccomp_selftest: Option<String>,
}

impl SeccompArgs {
    /// Chooses the process's filters; every thread installs its own as it starts.
    pub fn configure(&self) -> Result<(), String> {
        use vessel_seccomp::{Action, Policy, ThreadKind};
        let policy = if self.no_seccomp || self.seccomp_level == Some(0) {
            Policy::Off
        } else if let Some(path) = &self.seccomp_filter {
            Policy::from_file(path).map_err(|e| ErrorChain(&e).to_string())?
        } else if self.seccomp_log {
            Policy::Builtin(Action::Log)
        } else {
            Policy::Builtin(Action::Kill)
        };
        if let Some(k) = &self.seccomp_selftest {
            let kind =
                ThreadKind::from_key(k).ok_or_else(|| format!("'{k}' is not a thread kind"))?;
            vessel_seccomp::set_selftest(kind);
        }
        vessel_seccomp::configure(policy).map_err(|e| ErrorChain(&e).to_string())
    }
}

pub fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not a log level (error, warn, info, debug, trace)"))
}

/// Help and version go out as clap writes them; a usage error becomes one line, naming
/// `program`.
pub fn usage_error(e: clap::Error, program: &str) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let text = e.to_string();
    let line = text.lines().next().unwrap_or("invalid arguments");
    eprintln!(
        "{program}: {} (see {program} --help)",
        line.trim_start_matches("error: ")
    );
    ExitCode::from(2)
}

/// The first line is shaped as Firecracker's `Firecracker v1.x.y`, whose second word tools
/// parse as the version of the API they will talk to (Kata Containers: first line, second
/// word, leading 'v' stripped, at least 0.21.1); it gives the Firecracker API version Vessel
/// implements, and names Vessel's own version after it.
/// Invoked as `firecracker`, the first line is exactly Firecracker's (`Firecracker v1.16.1`),
/// which Firecracker's own tests parse.
pub fn version_text(as_firecracker: bool) -> String {
    let api = vessel_api::FIRECRACKER_API_VERSION;
    let own = env!("CARGO_PKG_VERSION");
    if as_firecracker {
        format!("Firecracker v{api}\n\nVessel v{own}, a Firecracker-compatible VMM\n")
    } else {
        format!("Vessel v{api} (Firecracker API v{api}; vessel {own})\n")
    }
}

/// Whether the process was started under the name `firecracker` (a drop-in binary or link).
pub fn invoked_as_firecracker() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == "firecracker"))
        .unwrap_or(false)
}

/// Firecracker mode's flags and the global ones: the whole command line of the
/// `firecracker` binary, and what `vessel` parses first when no argument names one of its
/// subcommands (building its whole parser, every subcommand's flags, took about 0.2 ms of
/// Firecracker mode's start).
#[derive(Parser)]
#[command(
    name = "firecracker",
    disable_version_flag = true,
    about = "Vessel's Firecracker drop-in: serves Firecracker's API and process flags (with no flag, on /run/firecracker.socket)"
)]
pub struct FirecrackerCli {
    /// Print the version: the Firecracker version served, then Vessel's own.
    #[arg(short = 'V', long)]
    pub version: bool,
    /// Log level for Vessel's own messages before a logger is configured (error, warn,
    /// info, debug, trace).
    #[arg(long, default_value = "warn", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
    #[command(flatten)]
    pub firecracker: firecracker::FirecrackerArgs,
    #[command(flatten)]
    pub seccomp: SeccompArgs,
}

/// The `firecracker` binary: Firecracker mode and nothing else, under whatever name it is
/// started. Without a flag it serves `/run/firecracker.socket`, as Firecracker does.
pub fn firecracker_main() -> ExitCode {
    let started_us = firecracker::clock_us(libc::CLOCK_MONOTONIC);
    let cli = match FirecrackerCli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage_error(e, "firecracker"),
    };
    if cli.version {
        print!("{}", version_text(true));
        return ExitCode::SUCCESS;
    }
    logger::init(cli.log_level);
    if let Some(done) = firecracker::print_and_exit(&cli.firecracker) {
        return done.unwrap_or_else(|e| {
            eprintln!("firecracker: {}", ErrorChain(&e));
            ExitCode::FAILURE
        });
    }
    let seccomp = cli.seccomp.configure();
    firecracker::main(cli.firecracker, started_us, seccomp.err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_names_firecracker_first_when_invoked_as_it() {
        let fc = version_text(true);
        assert_eq!(
            fc.lines().next(),
            Some(format!("Firecracker v{}", vessel_api::FIRECRACKER_API_VERSION).as_str())
        );
        assert!(version_text(false).starts_with("Vessel v"));
    }

    #[test]
    fn levels_parse_and_mistakes_say_what_is_allowed() {
        assert_eq!(parse_level("debug"), Ok(log::LevelFilter::Debug));
        let e = parse_level("loud").unwrap_err();
        assert!(e.contains("'loud'") && e.contains("trace"), "{e}");
    }
}
