//! Where a guest spends its time: RIP samples taken at periodic kicks of `KVM_RUN`, grouped by
//! the kernel function they fall in (from the kernel's `System.map`).

use std::collections::HashMap;
use std::path::Path;

/// Text symbols of a `System.map`, sorted by address.
pub struct SymbolMap {
    syms: Vec<(u64, String)>,
}

impl SymbolMap {
    pub fn parse(text: &str) -> Self {
        let mut syms: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let kind = it.next()?;
                let name = it.next()?;
                matches!(kind, "t" | "T" | "w" | "W").then(|| (addr, name.to_string()))
            })
            .collect();
        syms.sort();
        SymbolMap { syms }
    }

    pub fn load(path: &Path) -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string(path)?))
    }

    /// The function containing `addr`.
    pub fn lookup(&self, addr: u64) -> Option<&str> {
        let i = self.syms.partition_point(|(a, _)| *a <= addr);
        (i > 0).then(|| self.syms[i - 1].1.as_str())
    }
}

/// A report of the top `n` functions by sample count.
pub fn report(samples: &[u64], map: Option<&SymbolMap>, n: usize) -> String {
    if samples.is_empty() {
        return "profile: no samples\n".to_string();
    }
    let mut counts: HashMap<String, u64> = HashMap::new();
    for &rip in samples {
        *counts.entry(name_of(rip, map)).or_default() += 1;
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let total = samples.len() as f64;
    let mut out = format!("profile: {} samples\n", samples.len());
    for (name, c) in v.into_iter().take(n) {
        out += &format!("{:6.2}% {:6} {}\n", c as f64 * 100.0 / total, c, name);
    }
    out
}

/// Name of the function a sample falls in (or a placeholder).
fn name_of(rip: u64, map: Option<&SymbolMap>) -> String {
    if rip < 0x8000_0000_0000 {
        return "(guest user mode)".to_string();
    }
    match map.and_then(|m| m.lookup(rip)) {
        Some(s) => s.to_string(),
        None => format!("{rip:#x}"),
    }
}

/// One vCPU's samples (taken every `period`) in windows of `window`: the `n` hottest
/// functions of each window, so that each phase of a boot shows what it spends its time on.
pub fn timeline(
    samples: &[u64],
    period: std::time::Duration,
    map: Option<&SymbolMap>,
    window: std::time::Duration,
    n: usize,
) -> String {
    let per_window = (window.as_nanos() / period.as_nanos().max(1)).max(1) as usize;
    let mut out = format!("timeline (vCPU 0, {} s windows):\n", window.as_secs_f64());
    for (i, chunk) in samples.chunks(per_window).enumerate() {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for &rip in chunk {
            *counts.entry(name_of(rip, map)).or_default() += 1;
        }
        let mut v: Vec<_> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let top: Vec<String> = v
            .into_iter()
            .take(n)
            .map(|(name, c)| format!("{name} {}%", c * 100 / chunk.len()))
            .collect();
        out += &format!(
            "{:7.1}s  {}\n",
            (i * per_window) as f64 * period.as_secs_f64(),
            top.join(", ")
        );
    }
    out
}

/// The profile of a finished VM sampled every `period`: where all vCPUs spent their time,
/// then the boot vCPU's samples over time (where each phase of a boot goes), symbolized with
/// `system_map` when it loads.
pub(crate) fn vm_profile(
    reports: &[crate::vcpu::VcpuReport],
    system_map: Option<&Path>,
    period: std::time::Duration,
) -> String {
    let samples: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.samples.iter().copied())
        .collect();
    let map = system_map.and_then(|p| SymbolMap::load(p).ok());
    let mut text = report(&samples, map.as_ref(), 40);
    if let Some(boot) = reports.first() {
        text += &timeline(
            &boot.samples,
            period,
            map.as_ref(),
            std::time::Duration::from_secs(5),
            3,
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "ffffffff81000000 T _text\nffffffff81000100 t do_thing\nffffffff81000200 D some_data\nffffffff81000300 T other\n";

    #[test]
    fn lookup_finds_the_enclosing_text_symbol() {
        let m = SymbolMap::parse(MAP);
        assert_eq!(m.lookup(0xffffffff81000150), Some("do_thing"));
        // Data symbols are skipped: 0x250 is still in do_thing.
        assert_eq!(m.lookup(0xffffffff81000250), Some("do_thing"));
        assert_eq!(m.lookup(0xffffffff81000300), Some("other"));
        assert_eq!(m.lookup(0x1000), None);
    }

    #[test]
    fn report_ranks_functions() {
        let m = SymbolMap::parse(MAP);
        let s = [
            0xffffffff81000150,
            0xffffffff81000160,
            0xffffffff81000310,
            0x401000,
        ];
        let r = report(&s, Some(&m), 10);
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines[0], "profile: 4 samples");
        assert!(lines[1].ends_with("do_thing") && lines[1].contains("50.00%"));
        assert!(r.contains("(guest user mode)"));
    }

    #[test]
    fn timeline_windows_name_the_hottest_function() {
        let m = SymbolMap::parse(MAP);
        // 10 ms samples, 20 ms windows: [a a] [b a] [b]
        let a = 0xffffffff81000150;
        let b = 0xffffffff81000310;
        let t = timeline(
            &[a, a, b, a, b],
            std::time::Duration::from_millis(10),
            Some(&m),
            std::time::Duration::from_millis(20),
            1,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[1].trim_start().starts_with("0.0s") && lines[1].ends_with("do_thing 100%"),
            "{t}"
        );
        assert!(
            lines[3].trim_start().starts_with("0.0s") || lines[3].contains("other 100%"),
            "{t}"
        );
    }
}
