//! The virtio-pci transport (virtio 1.2, section 4.1): modern device only.
