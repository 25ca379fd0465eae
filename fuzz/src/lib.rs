//! Fuzz targets for the inputs Vessel does not trust: kernel images, API requests and config
//! files, virtqueues a guest driver lays out, snapshot state and migration frames, the
//! instructions the user-space completer decodes, and the port and DMA accesses firmware makes
//! to the fw_cfg device.
//!
//! Each target is a plain `fn(&[u8])` in [`targets`], so that the same code runs under
//! `cargo fuzz` (the `fuzz_targets/` binaries, libFuzzer) and under the stable in-process
//! driver (`src/bin/driver.rs`). A target must return for every input: a panic, an abort or a
//! hang is a finding.

pub mod devices;
pub mod targets;

/// A fuzz target: must return for every input.
pub type Target = fn(&[u8]);

/// Every target, by name, for the stable driver.
pub const TARGETS: &[(&str, Target)] = &[
    ("boot_loader", targets::boot_loader),
    ("api_request", targets::api_request),
    ("config_file", targets::config_file),
    ("snapshot_state", targets::snapshot_state),
    ("snapshot_frame", targets::snapshot_frame),
    ("emulate", targets::emulate),
    ("virtio_block", targets::virtio_block),
    ("virtio_net", targets::virtio_net),
    ("virtio_vsock", targets::virtio_vsock),
    ("virtio_rng", targets::virtio_rng),
    ("virtio_balloon", targets::virtio_balloon),
    ("virtio_console", targets::virtio_console),
    ("virtio_pmem", targets::virtio_pmem),
    ("qcow2_open", targets::qcow2_open),
    ("boot_config", targets::boot_config),
    ("disk_scan", targets::disk_scan),
    ("fw_cfg", targets::fw_cfg),
];

/// The `virtio_*` targets and the device each drives (for the replay test's checks).
pub const DEVICE_TARGETS: &[(&str, devices::Kind)] = &[
    ("virtio_block", devices::Kind::Block),
    ("virtio_net", devices::Kind::Net),
    ("virtio_vsock", devices::Kind::Vsock),
    ("virtio_rng", devices::Kind::Rng),
    ("virtio_balloon", devices::Kind::Balloon),
    ("virtio_console", devices::Kind::Console),
    ("virtio_pmem", devices::Kind::Pmem),
];
