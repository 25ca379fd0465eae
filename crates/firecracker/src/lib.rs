//! Firecracker compatibility: Vessel as Firecracker's process. Firecracker's flags and
//! process behaviour ([`firecracker`], [`cli`]), the adapter from its HTTP API to the VMM
//! core ([`fc`]), its logger ([`logger`]), and the pieces the `vessel` command shares with it
//! (cloud-init seed disks in [`seed`], in-memory files in [`memfile`]).
//!
//! The crate's binary, `firecracker`, is Firecracker mode alone: without the `vessel`
//! command's subcommands (image builds, migration, the API client) it maps less code, which
//! is most of a microVM monitor's resident set; `vessel` serves the same mode when given
//! Firecracker's flags.

pub mod cli;
pub mod fc;
pub mod firecracker;
pub mod logger;
pub mod memfile;
pub mod seed;
mod trim;
