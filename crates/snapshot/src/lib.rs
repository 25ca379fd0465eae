//! Snapshot files, independent of what is in them.
//!
//! - [`format`]: the state file: a fixed header (magic, format version, payload length,
//!   CRC-32 of the payload) and a self-describing JSON payload. A file from another format
//!   version, a truncated or damaged file is refused before anything is parsed or applied.
//! - [`memory`]: guest memory files: written whole (zero pages left as holes), or only the
//!   dirty pages (diff), merged onto a base ([`memory::rebase`]) and mapped back privately
//!   so a restored guest faults its pages in lazily.
//! - [`dirty`]: page bitmaps, from KVM's dirty log or the VMM's own writes.
//! - [`stream`]: the live-migration wire format.

pub mod dirty;
pub mod format;
pub mod memory;
pub mod stream;

pub use dirty::DirtyBitmap;
pub use format::{read_state, write_state, SnapshotError, FORMAT_VERSION};
