//! The running balloon as the API sees it: its state, the statistics poller, and the
//! device's figures in the API's units.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use vessel_api::types::{Balloon as ApiBalloon, BalloonStats as ApiBalloonStats};
use vessel_api::ApiError;
use vessel_virtio_devices::balloon::{
    stat_tag, BalloonCounters, BalloonHandle, HintingError, PAGE_SIZE as BALLOON_PAGE,
};
use vessel_vmm::{RunState, VmHandle};

/// A running balloon: its handle, how it was configured, and the statistics polling
/// interval its poller thread reads.
pub(super) struct BalloonState {
    pub(super) handle: BalloonHandle,
    pub(super) config: ApiBalloon,
    pub(super) interval_s: Arc<AtomicU16>,
}

impl BalloonState {
    /// The balloon of a started or restored VM; its statistics are polled if configured.
    pub(super) fn start(
        vm: VmHandle,
        handle: BalloonHandle,
        config: ApiBalloon,
    ) -> Result<BalloonState, ApiError> {
        let interval_s = Arc::new(AtomicU16::new(config.stats_polling_interval_s));
        if config.stats_polling_interval_s > 0 {
            let (h, i) = (handle.clone(), interval_s.clone());
            thread::Builder::new()
                .name("balloon-stats".into())
                .spawn(move || poll_balloon_stats(vm, h, i))
                .map_err(|e| ApiError::Internal(format!("cannot start a thread: {e}")))?;
        }
        Ok(BalloonState {
            handle,
            config,
            interval_s,
        })
    }

    /// Firecracker's `balloon` metrics group: the device's totals (metrics lines report what
    /// changed since the previous one).
    pub(super) fn metrics(&self, out: &mut Map<String, Value>) {
        let now = self.handle.counters();
        let d = |f: fn(&BalloonCounters) -> u64| f(&now);
        out.insert(
            "balloon".into(),
            json!({
                "inflate_count": d(|c| c.inflate_chains),
                "deflate_count": d(|c| c.deflate_chains),
                "stats_updates_count": d(|c| c.stats_updates),
                "free_page_report_count": d(|c| c.reported_ranges),
                "free_page_report_freed": d(|c| c.reported_bytes),
                "free_page_hint_count": d(|c| c.hinted_ranges),
                "free_page_hint_freed": d(|c| c.hinted_bytes),
            }),
        );
    }
}

/// Balloon pages per MiB.
pub(super) const BALLOON_PAGES_PER_MIB: u32 = (1 << 20) / BALLOON_PAGE as u32;

/// Asks the balloon driver for fresh statistics every `interval_s` seconds (read again each
/// round, so `PATCH /balloon/statistics` takes effect at once) until the VM ends.
fn poll_balloon_stats(vm: VmHandle, balloon: BalloonHandle, interval_s: Arc<AtomicU16>) {
    let mut last = Instant::now();
    while vm.state() != RunState::Ended {
        thread::sleep(Duration::from_millis(100));
        let every = Duration::from_secs(u64::from(interval_s.load(Ordering::Relaxed)));
        if !every.is_zero() && last.elapsed() >= every {
            balloon.request_stats();
            last = Instant::now();
        }
    }
}

/// A hinting request the balloon refuses, in Firecracker's words.
pub(super) fn hinting_error(e: HintingError) -> ApiError {
    ApiError::bad(format!("Balloon update error: Balloon: {e}"))
}

/// The API's view of the balloon's figures.
pub(super) fn balloon_stats(h: &BalloonHandle) -> ApiBalloonStats {
    let (target, actual) = (h.target_pages(), h.actual_pages());
    let mut s = ApiBalloonStats {
        target_pages: target,
        actual_pages: actual,
        target_mib: target / BALLOON_PAGES_PER_MIB,
        actual_mib: actual / BALLOON_PAGES_PER_MIB,
        ..Default::default()
    };
    for (tag, value) in h.latest_stats().map(|l| l.entries).unwrap_or_default() {
        let slot = match tag {
            stat_tag::SWAP_IN => &mut s.swap_in,
            stat_tag::SWAP_OUT => &mut s.swap_out,
            stat_tag::MAJFLT => &mut s.major_faults,
            stat_tag::MINFLT => &mut s.minor_faults,
            stat_tag::MEMFREE => &mut s.free_memory,
            stat_tag::MEMTOT => &mut s.total_memory,
            stat_tag::AVAIL => &mut s.available_memory,
            stat_tag::CACHES => &mut s.disk_caches,
            stat_tag::HTLB_PGALLOC => &mut s.hugetlb_allocations,
            stat_tag::HTLB_PGFAIL => &mut s.hugetlb_failures,
            stat_tag::OOM_KILLS => &mut s.oom_kill,
            stat_tag::ALLOC_STALL => &mut s.alloc_stall,
            stat_tag::ASYNC_SCAN => &mut s.async_scan,
            stat_tag::DIRECT_SCAN => &mut s.direct_scan,
            stat_tag::ASYNC_RECLAIM => &mut s.async_reclaim,
            stat_tag::DIRECT_RECLAIM => &mut s.direct_reclaim,
            _ => continue,
        };
        *slot = Some(value);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balloon_figures_in_api_units() {
        let dev = vessel_virtio_devices::balloon::Balloon::new(Default::default()).unwrap();
        let h = dev.handle();
        h.set_target_mib(12);
        let s = balloon_stats(&h);
        assert_eq!((s.target_pages, s.target_mib), (12 * 256, 12));
        assert_eq!((s.actual_pages, s.actual_mib, s.free_memory), (0, 0, None));
    }
}
