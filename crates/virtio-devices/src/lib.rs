//! Virtio devices for Vessel, each a [`vessel_virtio::VirtioDevice`] with its own worker
//! thread: block (raw files), net (TAP), vsock (Unix-socket host side), rng (`getrandom`),
//! balloon, console, pmem (a host file mapped as guest persistent memory); virtio-fs on a
//! vhost-user backend (`virtiofsd`). Transports and
//! the shared device core are in `vessel-virtio`.

pub mod balloon;
pub mod block;
pub mod console;
pub mod mem;
pub mod net;
pub mod pmem;
pub mod rng;
#[cfg(test)]
mod snapshot_tests;
pub mod vhost_user;
pub mod vsock;
