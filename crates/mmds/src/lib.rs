//! Firecracker's microVM metadata service (MMDS), the guest's side: the guest reaches a JSON
//! data store (the one `PUT`/`PATCH /mmds` writes) with HTTP at a link-local address on a
//! network interface, without any host networking.
//!
//! - [`service`]: the HTTP service, V1 (plain `GET`s) and V2 (session tokens from
//!   `PUT /latest/api/token`), JSON or IMDS text answers; a pure function of the request
//!   bytes and the time.
//! - [`stack`]: the Ethernet/ARP/TCP endpoint that owns the MMDS address on one interface;
//!   the virtio-net device offers it each frame the guest sends and delivers its frames to
//!   the guest.
//!
//! One [`Mmds`] per VM is shared by the [`MmdsStack`]s of the interfaces that have MMDS.

pub mod service;
pub mod stack;

pub use service::{Mmds, MmdsOptions, Served, Version};
pub use stack::{MmdsStack, StackStats, MAX_FRAME_LEN, MMDS_MAC};
