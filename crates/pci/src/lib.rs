//! PCI for Vessel: type-0 configuration space, BARs, capabilities, MSI-X, and the host bridge
//! that serves configuration access through ports 0xcf8/0xcfc and ECAM.
