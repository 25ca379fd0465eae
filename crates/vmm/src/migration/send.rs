//! The sender's side of a live migration: pre-copy rounds while the guest runs, then
//! stop-and-copy and the hand-over (see [`super`]).

use std::io::Write;
use std::time::Instant;

use vessel_memory::vm_memory::{Bytes, GuestAddress};
use vessel_memory::GuestMemoryMmap;
use vessel_snapshot::dirty::{DirtyBitmap, PAGE_SIZE};
use vessel_snapshot::stream::{self, FrameType, MAX_PAGES_RUN};

use super::{Connection, Hello, MigrateOptions, MigrationError, MigrationStats, PROTOCOL_VERSION};
use crate::kvm_vm::register_memory;
use crate::machine::Machine;
use crate::snapshot::{capture, dirty_pages, quiesce_devices, resume_devices, VmSnapshot};

/// Sends the pages `pages` selects (all of them: `None`), reading guest memory with
/// volatile copies (the guest may be running). Zero pages are skipped when `skip_zero`
/// (the receiver's memory starts zeroed). Returns (pages, bytes) sent.
pub(super) fn send_pages(
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
                    .map_err(MigrationError::ReadMemory)?;
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
fn dirty_logging(m: &Machine, on: bool) -> Result<(), MigrationError> {
    register_memory(&m.vm, &m.mem, on).map_err(|e| MigrationError::DirtyLog(Box::new(e)))
}

/// The sender's side; see the module docs. `pause`/`resume` control the VM.
pub(crate) fn send(
    m: &Machine,
    conn: &mut Connection,
    opts: &MigrateOptions,
    pause: impl Fn() -> Result<(), MigrationError>,
    resume: impl Fn() -> Result<(), MigrationError>,
) -> Result<MigrationStats, MigrationError> {
    let t0 = Instant::now();
    let regions = vessel_snapshot::memory::layout(&m.mem);
    let mut stats = MigrationStats::default();
    dirty_logging(m, true)?;
    let result = (|| {
        // Clear what the logs held: from here on they are relative to the first pass.
        dirty_pages(m)?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            config: m.current_config(),
            regions: regions.clone(),
        };
        let hello = serde_json::to_vec(&hello).map_err(MigrationError::BadHello)?;
        stream::write_frame(conn, FrameType::Hello, &hello)?;

        let t = Instant::now();
        let (p, b) = send_pages(conn, &m.mem, &DirtyBitmap::all(&regions), true)?;
        stats.pages_live += p;
        stats.bytes_sent += b;
        // Bytes per second the link takes, measured on what was sent so far.
        let mut rate = b as f64 / t.elapsed().as_secs_f64().max(1e-6);
        let mut last_dirty = u64::MAX;
        stats.converged = "round limit".into();
        while stats.rounds < opts.max_rounds {
            let dirty = dirty_pages(m)?;
            let n = dirty.count();
            let eta = (n * PAGE_SIZE) as f64 / rate;
            if eta <= opts.downtime.as_secs_f64() {
                stats.converged = "target".into();
                // These pages are sent during the pause with whatever dirties meanwhile.
                let (p, b) = send_pages(conn, &m.mem, &dirty, false)?;
                stats.pages_live += p;
                stats.bytes_sent += b;
                break;
            }
            if stats.rounds >= 3 && n * 10 >= last_dirty * 9 {
                stats.converged = "not converging".into();
                let (p, b) = send_pages(conn, &m.mem, &dirty, false)?;
                stats.pages_live += p;
                stats.bytes_sent += b;
                break;
            }
            let t = Instant::now();
            let (p, b) = send_pages(conn, &m.mem, &dirty, false)?;
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
        let by_pause = m
            .devices_quiesced
            .load(std::sync::atomic::Ordering::Acquire);
        if !by_pause {
            quiesce_devices(m).map_err(|e| {
                let _ = resume();
                MigrationError::Snapshot(e)
            })?;
        }
        let stop_and_copy = (|| {
            let dirty = dirty_pages(m)?;
            let (p, b) = send_pages(conn, &m.mem, &dirty, false)?;
            stats.pages_paused += p;
            stats.bytes_sent += b;
            let state: VmSnapshot = capture(m, None)?;
            let bytes = vessel_snapshot::format::encode(&state).map_err(MigrationError::Encode)?;
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
                other => Err(MigrationError::UnexpectedAnswer(other)),
            }
        })();
        if let Err(e) = stop_and_copy {
            // The source keeps the VM: as it was, running or paused.
            if !by_pause {
                resume_devices(m);
            }
            let _ = resume();
            return Err(e);
        }
        stats.downtime_us = paused_at.elapsed().as_micros() as u64;
        Ok(())
    })();
    if result.is_err() && !m.config.track_dirty_pages {
        let _ = dirty_logging(m, false);
    }
    result?;
    stats.total_ms = t0.elapsed().as_millis() as u64;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

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
