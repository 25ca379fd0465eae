//! Virtio for Vessel: the device model every transport shares, and the transports.
//!
//! - [`device`]: the [`VirtioDevice`] trait a device implements once (what it offers, its
//!   configuration space, activation with the driver's queues, reset) and the
//!   [`VirtioInterrupt`] trait a transport implements to interrupt the driver;
//! - [`common`]: [`VirtioCommon`], the transport-independent registers: feature negotiation,
//!   the status state machine, queue configuration, activation and reset;
//! - [`mmio`]: the virtio-mmio transport (register decoding only);
//! - [`pci`]: the virtio-pci transport (capabilities, common config, notify, ISR, MSI-X);
//! - [`state`]: snapshot state of devices and transports (quiesce, save, resume, restore);
//! - [`worker`]: the epoll worker thread and queue-draining loop every device uses.
//!
//! Devices themselves live in `vessel-virtio-devices`; PCI config space and MSI-X in
//! `vessel-pci`. Nothing here talks to KVM: the VMM registers the queue kick events as
//! ioeventfds and interrupt events as irqfds.

pub mod common;
pub mod device;
pub mod mmio;
pub mod pci;
pub mod state;
pub mod worker;

pub use common::VirtioCommon;
pub use device::{
    device_type, features, read_config_bytes, ActivateContext, ActivateError, ActiveQueue,
    DeviceHealth, InterruptCause, VirtioDevice, VirtioInterrupt,
};
pub use mmio::MmioTransport;
pub use pci::{VirtioPciDevice, VirtioPciError, VirtioPciInterrupt};
pub use state::{
    BalloonState, ConsoleState, DeviceState, DeviceStateError, MemState, MmioTransportState,
    NetState, PciStateError, PmemState, QueueState, QueueStateError, StateError, VirtioCommonState,
    VirtioPciState,
};

/// Shows an error with its chain of sources, `error: source: source's source`, for logs,
/// the CLI and errors that end up as text where crates meet. A source whose text the line
/// already ends with (an error that still repeats its source) is not repeated.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.0.to_string();
        let mut next = self.0.source();
        while let Some(e) = next {
            let t = e.to_string();
            if !text.ends_with(&t) {
                text.push_str(": ");
                text.push_str(&t);
            }
            next = e.source();
        }
        f.write_str(&text)
    }
}
