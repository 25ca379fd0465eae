//! How a VM ended and what it did: [`VmOutcome`], [`ExitReason`], [`VmStats`].

use std::time::Duration;

use crate::vcpu::VcpuReport;

/// How the VM ended.
#[derive(Debug, Clone)]
pub struct VmOutcome {
    pub reason: ExitReason,
    pub stats: VmStats,
}

/// The end of a VM as the user sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    PowerOff,
    Reset,
    /// Ctrl-A x on the console.
    UserQuit,
    /// SIGINT or SIGTERM to the VMM.
    Signal,
    /// [`VmHandle::stop`].
    Stopped,
    /// Live-migrated to another process, which runs it now.
    Migrated,
}

/// Figures about a finished VM.
#[derive(Debug, Clone, Default)]
pub struct VmStats {
    pub nested: bool,
    /// From `run` being called to the boot vCPU's first `KVM_RUN`.
    pub to_first_run: Duration,
    /// From the moment given in `VESSEL_SPAWN_NS` (CLOCK_MONOTONIC, set by a benchmark just
    /// before it starts this process) to the first `KVM_RUN`.
    pub since_spawn: Option<Duration>,
    pub wall: Duration,
    pub vcpus: Vec<VcpuReport>,
    pub unhandled_io: (u64, u64),
    pub unhandled_mmio: (u64, u64),
    pub profile: Option<String>,
    /// How the kernel was loaded (e.g. decompressed on the host), for Linux guests.
    pub kernel: Option<String>,
    /// One line per virtio device that keeps statistics (disks: requests per wake-up).
    pub devices: Vec<String>,
}

impl VmStats {
    pub fn summary(&self) -> String {
        let mut s = String::new();
        if let Some(k) = &self.kernel {
            s += &format!("vessel: kernel: {k}\n");
        }
        if let Some(d) = self.since_spawn {
            s += &format!(
                "vessel: first KVM_RUN {:.3} ms after process spawn\n",
                d.as_secs_f64() * 1e3
            );
        }
        s += &format!(
            "vessel: first KVM_RUN after {:.2} ms, VM ran {:.3} s; nested fallback {}\n",
            self.to_first_run.as_secs_f64() * 1e3,
            self.wall.as_secs_f64(),
            if self.nested { "on" } else { "off" }
        );
        for (i, v) in self.vcpus.iter().enumerate() {
            s += &format!(
                "vessel: vCPU {i}: {} exits ({} port, {} mmio), {} kicks; {} syscalls redirected, {} faults stepped, {} instructions completed\n",
                v.exits, v.io_exits, v.mmio_exits, v.kicks, v.nested.syscalls, v.nested.faults_stepped, v.nested.completed
            );
        }
        s += &format!(
            "vessel: unhandled port reads/writes {}/{}, mmio {}/{}\n",
            self.unhandled_io.0, self.unhandled_io.1, self.unhandled_mmio.0, self.unhandled_mmio.1
        );
        for line in &self.devices {
            s += line;
            s.push('\n');
        }
        if let Some(p) = &self.profile {
            s += p;
        }
        s
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Time since the spawn instant a benchmark put in `VESSEL_SPAWN_NS`.
pub(crate) fn since_spawn() -> Option<Duration> {
    let t: u64 = std::env::var("VESSEL_SPAWN_NS").ok()?.parse().ok()?;
    Some(Duration::from_nanos(monotonic_ns().checked_sub(t)?))
}
