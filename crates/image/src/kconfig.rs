//! Kconfig fragments: Vessel's own guest/minimal.config (and guest/kata.config
//! on top of it for the `kata` image) and the check that
//! every option of it survived into the kernel's final `.config` (Kconfig
//! silently drops an option whose dependencies are not met).

/// Vessel's config fragment for the minimal kernel, embedded at compile time.
pub const MINIMAL_FRAGMENT: &str = include_str!("../../../guest/minimal.config");

/// What the `kata` image adds to [`MINIMAL_FRAGMENT`] for Kata Containers' agent.
pub const KATA_FRAGMENT: &str = include_str!("../../../guest/kata.config");

/// One option's value in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// `CONFIG_X=value` (`y`, `m`, a number, a quoted string...).
    Value(String),
    /// `# CONFIG_X is not set`.
    NotSet,
}

/// Parses config text into `(option, setting)` pairs in file order; other
/// comments and blank lines are skipped.
pub fn parse_config(text: &str) -> Vec<(String, Setting)> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# ") {
                let name = rest.strip_suffix(" is not set")?;
                return name
                    .starts_with("CONFIG_")
                    .then(|| (name.to_string(), Setting::NotSet));
            }
            let (name, value) = line.split_once('=')?;
            name.starts_with("CONFIG_")
                .then(|| (name.to_string(), Setting::Value(value.to_string())))
        })
        .collect()
}

fn render(s: Option<&Setting>) -> String {
    match s {
        Some(Setting::Value(v)) => v.clone(),
        Some(Setting::NotSet) | None => "not set".to_string(),
    }
}

/// The options of `fragment` whose setting is not the one in `config`, as
/// `CONFIG_X=want (got ...)`. An option the fragment wants off passes when
/// `config` has it off or does not mention it.
pub fn check_fragment(fragment: &str, config: &str) -> Vec<String> {
    let actual: std::collections::HashMap<String, Setting> =
        parse_config(config).into_iter().collect();
    parse_config(fragment)
        .into_iter()
        .filter_map(|(name, want)| {
            let got = actual.get(&name);
            let ok = match &want {
                Setting::NotSet => !matches!(got, Some(Setting::Value(v)) if v != "n"),
                Setting::Value(v) => got == Some(&Setting::Value(v.clone())),
            };
            (!ok).then(|| format!("{name}={} (got {})", render(Some(&want)), render(got)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_and_not_set() {
        let cfg = "# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=64\nCONFIG_S=\"x y\"\n\nFOO=1\n";
        assert_eq!(
            parse_config(cfg),
            vec![
                ("CONFIG_A".to_string(), Setting::Value("y".into())),
                ("CONFIG_B".to_string(), Setting::NotSet),
                ("CONFIG_N".to_string(), Setting::Value("64".into())),
                ("CONFIG_S".to_string(), Setting::Value("\"x y\"".into())),
            ]
        );
    }

    #[test]
    fn detects_dropped_and_changed_options() {
        let fragment = "CONFIG_PVH=y\nCONFIG_NR_CPUS=64\nCONFIG_VIRTIO_BLK=y\n# CONFIG_KVM_GUEST is not set\n# CONFIG_PARAVIRT is not set\n";
        let good =
            "CONFIG_PVH=y\nCONFIG_NR_CPUS=64\nCONFIG_VIRTIO_BLK=y\n# CONFIG_KVM_GUEST is not set\n";
        assert!(check_fragment(fragment, good).is_empty());
        let bad = "CONFIG_NR_CPUS=8\nCONFIG_VIRTIO_BLK=m\nCONFIG_PARAVIRT=y\n";
        assert_eq!(
            check_fragment(fragment, bad),
            [
                "CONFIG_PVH=y (got not set)",
                "CONFIG_NR_CPUS=64 (got 8)",
                "CONFIG_VIRTIO_BLK=y (got m)",
                "CONFIG_PARAVIRT=not set (got y)",
            ]
        );
    }

    #[test]
    fn kata_fragment_adds_what_the_agent_needs_and_overrides_nothing() {
        let minimal: std::collections::HashMap<String, Setting> =
            parse_config(MINIMAL_FRAGMENT).into_iter().collect();
        let kata = parse_config(KATA_FRAGMENT);
        for (name, _) in &kata {
            assert!(!minimal.contains_key(name), "{name} is minimal's already");
        }
        let kata: std::collections::HashMap<String, Setting> = kata.into_iter().collect();
        for name in [
            "UNIX98_PTYS",
            "CGROUPS",
            "MEMCG",
            "CPUSETS",
            "CGROUP_DEVICE",
            "NAMESPACES",
            "PID_NS",
            "MSDOS_PARTITION",
        ] {
            assert_eq!(
                kata.get(&format!("CONFIG_{name}")),
                Some(&Setting::Value("y".into())),
                "CONFIG_{name}"
            );
        }
    }

    #[test]
    fn minimal_fragment_has_the_required_options() {
        let opts: std::collections::HashMap<String, Setting> =
            parse_config(MINIMAL_FRAGMENT).into_iter().collect();
        let y = Setting::Value("y".into());
        for name in [
            "64BIT",
            "SMP",
            "PVH",
            "HYPERVISOR_GUEST",
            "ACPI",
            "PCI",
            "PCI_MSI",
            "VIRTIO_PCI",
            "VIRTIO_MMIO",
            "VIRTIO_MMIO_CMDLINE_DEVICES",
            "VIRTIO_BLK",
            "VIRTIO_NET",
            "VIRTIO_CONSOLE",
            "HW_RANDOM",
            "HW_RANDOM_VIRTIO",
            "VIRTIO_BALLOON",
            "VSOCKETS",
            "VIRTIO_VSOCKETS",
            "EXT4_FS",
            "BLK_DEV",
            "NET",
            "INET",
            "UNIX",
            "PACKET",
            "TTY",
            "SERIAL_8250",
            "SERIAL_8250_CONSOLE",
            "PRINTK",
            "PRINTK_TIME",
            "BLK_DEV_INITRD",
            "DEVTMPFS",
            "DEVTMPFS_MOUNT",
            "PROC_FS",
            "SYSFS",
            "TMPFS",
            "BINFMT_ELF",
            "BINFMT_SCRIPT",
            "NO_HZ_IDLE",
            "HZ_100",
            "RTC_CLASS",
            "RTC_DRV_CMOS",
            "X86_X2APIC",
            "EARLY_PRINTK",
            "MULTIUSER",
            "FUTEX",
            "EPOLL",
            "SIGNALFD",
            "TIMERFD",
            "EVENTFD",
            "SHMEM",
            "AIO",
            "FILE_LOCKING",
            "POSIX_TIMERS",
            "BUG",
        ] {
            assert_eq!(
                opts.get(&format!("CONFIG_{name}")),
                Some(&y),
                "CONFIG_{name}"
            );
        }
        for off in ["KVM_GUEST", "PARAVIRT", "PTP_1588_CLOCK_KVM", "MODULES"] {
            assert_eq!(
                opts.get(&format!("CONFIG_{off}")),
                Some(&Setting::NotSet),
                "CONFIG_{off}"
            );
        }
        assert_eq!(
            opts.get("CONFIG_NR_CPUS"),
            Some(&Setting::Value("64".into()))
        );
    }
}
