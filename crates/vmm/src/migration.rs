//! Live migration between two Vessel processes, over a Unix or TCP socket.
//!
//! The sender ([`crate::VmHandle::migrate`]) turns on KVM's dirty log, sends every non-zero
//! page while the guest runs, then re-sends the pages dirtied meanwhile, round after round,
//! until the pages left would go out within the downtime target, or the dirty set stops
//! shrinking (the guest dirties as fast as we send), or a round limit. Then it pauses the
//! guest, sends the last dirty pages and the VM state, and waits for the receiver's `Ack`:
//! only then does the source VM stop. Any failure before the `Ack` (the receiver dies, the
//! connection breaks, the receiver refuses the state) leaves the source running as before.
//!
//! The receiver ([`receive`]) builds guest memory from the sender's layout, writes the pages
//! as they come, builds the VM from the state exactly as a snapshot restore does, starts it
//! and answers `Ack`. The wire format is `vessel_snapshot::stream`.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vessel_memory::vm_memory::{Bytes, GuestAddress};
use vessel_memory::GuestMemoryMmap;
use vessel_snapshot::dirty::{DirtyBitmap, MemRegion, PAGE_SIZE};
use vessel_snapshot::stream::{self, FrameType, MAX_PAGES_RUN};

use crate::config::{SerialTarget, VmConfig};
use crate::error::VmmError;
use crate::snapshot::{capture, dirty_pages, quiesce_devices, resume_devices, Parts, VmSnapshot};
use crate::vcpu::PauseGate;
use crate::vm::{register_memory, RunningVm, Vm};

/// Where the receiver listens: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    Unix(PathBuf),
    Tcp(String),
}

impl std::str::FromStr for MigrationUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            Ok(MigrationUrl::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp:").filter(|a| a.contains(':')) {
            Ok(MigrationUrl::Tcp(a.to_string()))
        } else {
            Err(format!(
                "'{s}' is not a migration address: use unix:PATH or tcp:HOST:PORT"
            ))
        }
    }
}

/// A connected migration stream.
pub enum Connection {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(s) => s.read(buf),
            Connection::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Unix(s) => s.write(buf),
            Connection::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.flush(),
            Connection::Tcp(s) => s.flush(),
        }
    }
}

impl Connection {
    /// Connects to a listening receiver.
    pub fn connect(url: &MigrationUrl) -> io::Result<Connection> {
        Ok(match url {
            MigrationUrl::Unix(p) => Connection::Unix(UnixStream::connect(p)?),
            MigrationUrl::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                Connection::Tcp(s)
            }
        })
    }

    /// Listens on `url` and accepts one sender.
    pub fn accept(url: &MigrationUrl) -> io::Result<Connection> {
        Ok(match url {
            MigrationUrl::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p)?;
                let (s, _) = l.accept()?;
                let _ = std::fs::remove_file(p);
                Connection::Unix(s)
            }
            MigrationUrl::Tcp(a) => {
                let (s, _) = TcpListener::bind(a)?.accept()?;
                s.set_nodelay(true)?;
                Connection::Tcp(s)
            }
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Unix(s) => s.set_read_timeout(t),
            Connection::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

/// How to migrate.
#[derive(Debug, Clone, Copy)]
pub struct MigrateOptions {
    /// The longest pause the guest should see.
    pub downtime: Duration,
    /// Pre-copy rounds at most before stopping the guest anyway.
    pub max_rounds: u32,
    /// How long to wait for the receiver's answer once the state is sent.
    pub ack_timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            downtime: Duration::from_millis(10),
            max_rounds: 30,
            ack_timeout: Duration::from_secs(30),
        }
    }
}

/// What a migration did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationStats {
    /// Pre-copy rounds after the first full pass.
    pub rounds: u32,
    /// Bytes put on the wire.
    pub bytes_sent: u64,
    /// Pages sent while the guest ran, and while it was paused.
    pub pages_live: u64,
    pub pages_paused: u64,
    /// From the guest's pause to the receiver's `Ack`.
    pub downtime_us: u64,
    pub total_ms: u64,
    /// Why pre-copy ended: "target", "not converging" or "round limit".
    pub converged: String,
}

/// Why a migration failed; the source VM is running (or paused, if it was) as before.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("the VM is not running")]
    NotRunning,
    #[error("migration connection: {0}")]
    Io(#[from] io::Error),
    #[error("the receiver refused the VM: {0}")]
    Refused(String),
    #[error("{0}")]
    State(String),
}

/// The first frame: what the receiver needs to build memory before pages arrive.
#[derive(Serialize, Deserialize)]
struct Hello {
    version: u32,
    config: VmConfig,
    regions: Vec<MemRegion>,
}

const PROTOCOL_VERSION: u32 = 1;

/// Sends the pages `pages` selects (all of them: `None`), reading guest memory with
/// volatile copies (the guest may be running). Zero pages are skipped when `skip_zero`
/// (the receiver's memory starts zeroed). Returns (pages, bytes) sent.
fn send_pages(
    conn: &mut impl Write,
    mem: &GuestMemoryMmap,
    pages: &DirtyBitmap,
    skip_zero: bool,
) -> Result<(u64, u64), MigrationError> {
    let mut buf = vec![0u8; MAX_PAGES_RUN];
    let (mut n_pages, mut bytes) = (0u64, 0u64);
    let page = PAGE_SIZE as usize;
    for (i, region) in pages.regions().iter().enumerate() {
        for (first, count) in pages.runs(i) {
            let mut p = first;
            while p < first + count {
                let n = ((first + count - p) as usize).min(MAX_PAGES_RUN / page);
                let gpa = region.gpa + p * PAGE_SIZE;
                let chunk = &mut buf[..n * page];
                mem.read_slice(chunk, GuestAddress(gpa))
                    .map_err(|e| MigrationError::State(format!("reading guest memory: {e}")))?;
                // Send maximal runs of pages worth sending.
                let mut start: Option<usize> = None;
                for k in 0..=n {
                    let keep = k < n
                        && !(skip_zero
                            && vessel_snapshot::memory::is_zero(&chunk[k * page..(k + 1) * page]));
                    match (keep, start) {
                        (true, None) => start = Some(k),
                        (false, Some(s)) => {
                            stream::write_pages(
                                conn,
                                gpa + (s * page) as u64,
                                &chunk[s * page..k * page],
                            )?;
                            n_pages += (k - s) as u64;
                            bytes += ((k - s) * page + 17) as u64;
                            start = None;
                        }
                        _ => {}
                    }
                }
                p += n as u64;
            }
        }
    }
    Ok((n_pages, bytes))
}

/// Turns KVM's dirty log on or off for every memory slot.
fn dirty_logging(parts: &Parts, on: bool) -> Result<(), MigrationError> {
    register_memory(&parts.vm, &parts.mem, on).map_err(|e| MigrationError::State(e.to_string()))
}

/// The sender's side; see the module docs. `pause`/`resume` control the VM.
pub(crate) fn send(
    parts: &Parts,
    gate: &PauseGate,
    vcpus: usize,
    conn: &mut Connection,
    opts: &MigrateOptions,
    pause: impl Fn() -> Result<(), MigrationError>,
    resume: impl Fn() -> Result<(), MigrationError>,
) -> Result<MigrationStats, MigrationError> {
    let t0 = Instant::now();
    let regions = vessel_snapshot::memory::layout(&parts.mem);
    let mut stats = MigrationStats::default();
    dirty_logging(parts, true)?;
    let result = (|| {
        // Clear what the logs held: from here on they are relative to the first pass.
        dirty_pages(parts).map_err(|e| MigrationError::State(e.to_string()))?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            config: parts.config.clone(),
            regions: regions.clone(),
        };
        let hello = serde_json::to_vec(&hello).map_err(|e| MigrationError::State(e.to_string()))?;
        stream::write_frame(conn, FrameType::Hello, &hello)?;

        let t = Instant::now();
        let (p, b) = send_pages(conn, &parts.mem, &DirtyBitmap::all(&regions), true)?;
        stats.pages_live += p;
        stats.bytes_sent += b;
        // Bytes per second the link takes, measured on what was sent so far.
        let mut rate = b as f64 / t.elapsed().as_secs_f64().max(1e-6);
        let mut last_dirty = u64::MAX;
        stats.converged = "round limit".into();
        while stats.rounds < opts.max_rounds {
            let dirty = dirty_pages(parts).map_err(|e| MigrationError::State(e.to_string()))?;
            let n = dirty.count();
            let eta = (n * PAGE_SIZE) as f64 / rate;
            if eta <= opts.downtime.as_secs_f64() {
                stats.converged = "target".into();
                // These pages are sent during the pause with whatever dirties meanwhile.
                let (p, b) = send_pages(conn, &parts.mem, &dirty, false)?;
                stats.pages_live += p;
                stats.bytes_sent += b;
                break;
            }
            if stats.rounds >= 3 && n * 10 >= last_dirty * 9 {
                stats.converged = "not converging".into();
                let (p, b) = send_pages(conn, &parts.mem, &dirty, false)?;
                stats.pages_live += p;
                stats.bytes_sent += b;
                break;
            }
            let t = Instant::now();
            let (p, b) = send_pages(conn, &parts.mem, &dirty, false)?;
            stats.pages_live += p;
            stats.bytes_sent += b;
            if b > 0 {
                rate = b as f64 / t.elapsed().as_secs_f64().max(1e-6);
            }
            last_dirty = n;
            stats.rounds += 1;
        }

        // Stop and copy.
        let paused_at = Instant::now();
        pause()?;
        // Devices a pause quiesced stay so on failure (`resume` restarts them with the
        // vCPUs, or, for a VM that was paused before, leaves them stopped); those of a VM
        // started paused are quiesced here and restarted here.
        let by_pause = parts
            .devices_quiesced
            .load(std::sync::atomic::Ordering::Acquire);
        if !by_pause {
            quiesce_devices(parts).map_err(|e| {
                let _ = resume();
                MigrationError::State(e.to_string())
            })?;
        }
        let stop_and_copy = (|| {
            let dirty = dirty_pages(parts).map_err(|e| MigrationError::State(e.to_string()))?;
            let (p, b) = send_pages(conn, &parts.mem, &dirty, false)?;
            stats.pages_paused += p;
            stats.bytes_sent += b;
            let state: VmSnapshot = capture(parts, gate, vcpus, None)
                .map_err(|e| MigrationError::State(e.to_string()))?;
            let bytes = vessel_snapshot::format::encode(&state)
                .map_err(|e| MigrationError::State(e.to_string()))?;
            stream::write_frame(conn, FrameType::State, &bytes)?;
            stats.bytes_sent += bytes.len() as u64 + 9;
            conn.flush()?;
            conn.set_read_timeout(Some(opts.ack_timeout))?;
            let mut buf = Vec::new();
            match stream::read_frame(conn, &mut buf)? {
                FrameType::Ack => Ok(()),
                FrameType::Error => Err(MigrationError::Refused(
                    String::from_utf8_lossy(&buf).into_owned(),
                )),
                other => Err(MigrationError::Refused(format!(
                    "unexpected {other:?} frame"
                ))),
            }
        })();
        if let Err(e) = stop_and_copy {
            // The source keeps the VM: as it was, running or paused.
            if !by_pause {
                resume_devices(parts);
            }
            let _ = resume();
            return Err(e);
        }
        stats.downtime_us = paused_at.elapsed().as_micros() as u64;
        Ok(())
    })();
    if result.is_err() && !parts.config.track_dirty_pages {
        let _ = dirty_logging(parts, false);
    }
    result?;
    stats.total_ms = t0.elapsed().as_millis() as u64;
    Ok(stats)
}

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
                    return Err(VmmError::Device(format!(
                        "migration: the sender is gone before the hand-over: {e}"
                    )));
                }
                Ok(r)
            }
            Err(e) => {
                let _ =
                    stream::write_frame(&mut self.conn, FrameType::Error, e.to_string().as_bytes());
                Err(e)
            }
        }
    }
}

fn protocol(e: impl std::fmt::Display) -> VmmError {
    VmmError::Device(format!("migration: {e}"))
}

/// The receiver's side: reads a whole VM from `conn` and builds it. On failure the sender
/// is told why (it keeps running its VM). `serial` replaces the console target.
pub fn receive(mut conn: Connection, serial: Option<SerialTarget>) -> Result<Incoming, VmmError> {
    let r = receive_vm(&mut conn, serial);
    match r {
        Ok((vm, bytes)) => Ok(Incoming { vm, conn, bytes }),
        Err(e) => {
            let _ = stream::write_frame(&mut conn, FrameType::Error, e.to_string().as_bytes());
            Err(e)
        }
    }
}

fn receive_vm(conn: &mut Connection, serial: Option<SerialTarget>) -> Result<(Vm, u64), VmmError> {
    let mut buf = Vec::new();
    if stream::read_frame(conn, &mut buf).map_err(protocol)? != FrameType::Hello {
        return Err(protocol("the stream does not start with a hello"));
    }
    let mut bytes = buf.len() as u64;
    let hello: Hello = serde_json::from_slice(&buf).map_err(protocol)?;
    if hello.version != PROTOCOL_VERSION {
        return Err(protocol(format!(
            "protocol version {} (this Vessel speaks {PROTOCOL_VERSION})",
            hello.version
        )));
    }
    let ranges: Vec<(GuestAddress, usize)> = hello
        .regions
        .iter()
        .map(|r| (GuestAddress(r.gpa), r.size as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(protocol)?;
    let state: VmSnapshot = loop {
        let kind = stream::read_frame(conn, &mut buf).map_err(protocol)?;
        bytes += buf.len() as u64 + 9;
        match kind {
            FrameType::Pages => {
                let (gpa, data) = stream::parse_pages(&buf).map_err(protocol)?;
                // write_slice refuses ranges outside guest memory.
                mem.write_slice(data, GuestAddress(gpa))
                    .map_err(|e| protocol(format!("pages at {gpa:#x}: {e}")))?;
            }
            FrameType::State => {
                break vessel_snapshot::format::decode(&buf).map_err(protocol)?;
            }
            other => return Err(protocol(format!("unexpected {other:?} frame"))),
        }
    };
    if state.memory != hello.regions {
        return Err(protocol(
            "the state's memory layout differs from the hello's",
        ));
    }
    let mut config = state.config.clone();
    if let Some(s) = serial {
        config.serial = s;
    }
    let vm = Vm::from_snapshot(&config, mem, &state)?;
    Ok((vm, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(
            "unix:/tmp/m.sock".parse::<MigrationUrl>(),
            Ok(MigrationUrl::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:4000".parse::<MigrationUrl>(),
            Ok(MigrationUrl::Tcp("127.0.0.1:4000".into()))
        );
        for bad in ["", "unix:", "tcp:host", "http://x", "/tmp/m.sock"] {
            assert!(bad.parse::<MigrationUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pages_go_out_in_runs_without_zero_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * 4096)]).unwrap();
        mem.write_obj(1u8, GuestAddress(4096)).unwrap();
        mem.write_obj(2u8, GuestAddress(2 * 4096)).unwrap();
        mem.write_obj(3u8, GuestAddress(10 * 4096)).unwrap();
        let regions = vessel_snapshot::memory::layout(&mem);
        let mut wire = Vec::new();
        let (pages, _) = send_pages(&mut wire, &mem, &DirtyBitmap::all(&regions), true).unwrap();
        assert_eq!(pages, 3);
        // Read back into fresh memory.
        let back = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * 4096)]).unwrap();
        let mut r = &wire[..];
        let mut buf = Vec::new();
        let mut frames = 0;
        while let Ok(FrameType::Pages) = stream::read_frame(&mut r, &mut buf) {
            let (gpa, data) = stream::parse_pages(&buf).unwrap();
            back.write_slice(data, GuestAddress(gpa)).unwrap();
            frames += 1;
        }
        assert_eq!(frames, 2, "pages 1-2 in one run, page 10 in another");
        for (a, v) in [(4096u64, 1u8), (2 * 4096, 2), (10 * 4096, 3), (0, 0)] {
            assert_eq!(back.read_obj::<u8>(GuestAddress(a)).unwrap(), v);
        }
        // A dirty zero page is sent (the receiver may hold old data there).
        let mut dirty = DirtyBitmap::new(&regions);
        dirty.mark(20 * 4096, 1);
        let (pages, _) = send_pages(&mut Vec::new(), &mem, &dirty, false).unwrap();
        assert_eq!(pages, 1);
    }
}
