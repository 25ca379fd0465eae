//! Why a legacy device refused a saved state.

/// A saved state that does not fit the device it is loaded into.
#[derive(Debug, thiserror::Error)]
pub enum SavedStateError {
    #[error("serial backlog of {0} bytes")]
    SerialBacklog(usize),
    #[error("serial interrupt")]
    SerialInterrupt(#[source] std::io::Error),
    #[error("serial state refused")]
    SerialRefused(#[source] vm_superio::serial::Error<std::io::Error>),
    #[error("i8042 state has the wrong size")]
    I8042Size,
    #[error("RTC state has {0} bytes of CMOS")]
    RtcCmos(usize),
}
