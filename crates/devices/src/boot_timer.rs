//! Firecracker's boot timer (`--boot-timer`): a one-byte MMIO register at
//! `vessel_memory::addr::BOOT_TIMER_START`. When the guest writes
//! [`BOOT_COMPLETE`] there (its init does, once the boot it wants to time is over), the VMM
//! logs, at info level and in Firecracker's words, the wall-clock and process CPU time since
//! the VM started being built (`InstanceStart`):
//!
//! ```text
//! Guest-boot-time =  12345 us 12 ms,   6789 CPU us 6 CPU ms
//! ```

use std::time::{Duration, Instant};

use crate::bus::BusDevice;

/// The value that marks the end of the boot.
pub const BOOT_COMPLETE: u8 = 123;
/// The register window on the MMIO bus.
pub const BOOT_TIMER_LEN: u64 = 0x1000;

/// The CPU time this process has used (`CLOCK_PROCESS_CPUTIME_ID`).
pub fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; on failure it is left zero.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// The boot timer device.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    start_cpu: Duration,
}

impl BootTimer {
    /// A timer counting from now.
    pub fn start() -> BootTimer {
        BootTimer {
            start: Instant::now(),
            start_cpu: process_cpu_time(),
        }
    }

    /// The line logged for a boot that took `wall` and `cpu`.
    pub fn message(wall: Duration, cpu: Duration) -> String {
        let (us, cpu_us) = (wall.as_micros(), cpu.as_micros());
        format!(
            "Guest-boot-time = {us:>6} us {} ms, {cpu_us:>6} CPU us {} CPU ms",
            us / 1000,
            cpu_us / 1000
        )
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Only a one-byte write of [`BOOT_COMPLETE`] at offset 0 counts, as in Firecracker.
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data == [BOOT_COMPLETE] {
            let cpu = process_cpu_time().saturating_sub(self.start_cpu);
            log::info!("{}", BootTimer::message(self.start.elapsed(), cpu));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_firecracker_s() {
        let m = BootTimer::message(Duration::from_micros(12_345), Duration::from_micros(6_789));
        assert_eq!(
            m,
            "Guest-boot-time =  12345 us 12 ms,   6789 CPU us 6 CPU ms"
        );
    }

    #[test]
    fn process_cpu_time_advances_with_work() {
        let a = process_cpu_time();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        std::hint::black_box(x);
        assert!(process_cpu_time() > a);
    }
}
