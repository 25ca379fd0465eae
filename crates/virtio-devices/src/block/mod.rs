//! virtio-block.
