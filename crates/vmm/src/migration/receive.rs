//! The receiver's side of a live migration: memory from the sender's layout, the pages as
//! they come, then the VM built from the state as a snapshot restore builds it (see
//! [`super`]).

use vessel_memory::vm_memory::{Bytes, GuestAddress};
use vessel_memory::GuestMemoryMmap;
use vessel_snapshot::stream::{self, FrameType};

use super::{Connection, Hello, MigrationError, PROTOCOL_VERSION};
use crate::builder::{self, Vm};
use crate::config::SerialTarget;
use crate::error::{ErrorChain, VmmError};
use crate::running::RunningVm;
use crate::snapshot::VmSnapshot;

/// A VM received from a sender, built but not started; [`Incoming::start`] runs it and
/// tells the sender.
pub struct Incoming {
    pub vm: Vm,
    conn: Connection,
    /// Bytes received.
    pub bytes: u64,
}

impl Incoming {
    /// Starts the VM, then answers `Ack` so the sender lets go of its copy.
    pub fn start(mut self) -> Result<RunningVm, VmmError> {
        match self.vm.start() {
            Ok(r) => {
                // If the sender is gone now, both copies would run: stop ours.
                if let Err(e) = stream::write_frame(&mut self.conn, FrameType::Ack, &[]) {
                    r.handle().stop();
                    let _ = r.wait();
                    return Err(VmmError::Migration(MigrationError::SenderGone(e)));
                }
                Ok(r)
            }
            Err(e) => {
                let why = ErrorChain(&e).to_string();
                let _ = stream::write_frame(&mut self.conn, FrameType::Error, why.as_bytes());
                Err(e)
            }
        }
    }
}

/// The receiver's side: reads a whole VM from `conn` and builds it. On failure the sender
/// is told why (it keeps running its VM). `serial` replaces the console target.
pub fn receive(mut conn: Connection, serial: Option<SerialTarget>) -> Result<Incoming, VmmError> {
    let r = receive_vm(&mut conn, serial);
    match r {
        Ok((vm, bytes)) => Ok(Incoming { vm, conn, bytes }),
        Err(e) => {
            let why = ErrorChain(&e).to_string();
            let _ = stream::write_frame(&mut conn, FrameType::Error, why.as_bytes());
            Err(e)
        }
    }
}

fn receive_vm(conn: &mut Connection, serial: Option<SerialTarget>) -> Result<(Vm, u64), VmmError> {
    let mut buf = Vec::new();
    if stream::read_frame(conn, &mut buf).map_err(MigrationError::Io)? != FrameType::Hello {
        return Err(MigrationError::NoHello.into());
    }
    let mut bytes = buf.len() as u64;
    let hello: Hello = serde_json::from_slice(&buf).map_err(MigrationError::BadHello)?;
    if hello.version != PROTOCOL_VERSION {
        return Err(MigrationError::Version(hello.version).into());
    }
    let ranges: Vec<(GuestAddress, usize)> = hello
        .regions
        .iter()
        .map(|r| (GuestAddress(r.gpa), r.size as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(MigrationError::Memory)?;
    let state: VmSnapshot = loop {
        let kind = stream::read_frame(conn, &mut buf).map_err(MigrationError::Io)?;
        bytes += buf.len() as u64 + 9;
        match kind {
            FrameType::Pages => {
                let (gpa, data) = stream::parse_pages(&buf).map_err(MigrationError::Io)?;
                // write_slice refuses ranges outside guest memory.
                mem.write_slice(data, GuestAddress(gpa))
                    .map_err(|source| MigrationError::Pages { gpa, source })?;
            }
            FrameType::State => {
                break vessel_snapshot::format::decode(&buf).map_err(MigrationError::Decode)?;
            }
            other => return Err(MigrationError::UnexpectedFrame(other).into()),
        }
    };
    if state.memory != hello.regions {
        return Err(MigrationError::LayoutMismatch.into());
    }
    let mut config = state.config.clone();
    if let Some(s) = serial {
        config.serial = s;
    }
    let vm = builder::build_from_snapshot(&config, mem, &state)?;
    Ok((vm, bytes))
}
