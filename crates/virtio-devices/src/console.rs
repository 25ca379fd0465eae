//! virtio-console.
