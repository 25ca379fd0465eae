//! The error every API operation returns, and how it maps to an HTTP status.

/// An API error. Its `Display` text becomes the `fault_message` of the response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Bad input (400).
    #[error("{0}")]
    BadRequest(String),
    /// The feature exists in Firecracker's API but not (yet) in Vessel (400).
    #[error("The requested operation is not supported: {0}")]
    Unsupported(String),
    /// The call is only valid after `InstanceStart` (400).
    #[error("The requested operation is not supported before starting the microVM.")]
    NotSupportedPreBoot,
    /// The call is only valid before `InstanceStart` (400).
    #[error("The requested operation is not supported after starting the microVM.")]
    NotSupportedPostBoot,
    /// The body exceeds a limit (413), e.g. the MMDS data store limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The VMM failed (500).
    #[error("Internal VMM error: {0}")]
    Internal(String),
}

/// Firecracker's fault for a TAP that cannot be opened (its system error `io`), with Vessel's
/// explanation after it.
pub fn tap_open_fault(name: &str, io: &dyn std::fmt::Display, detail: &str) -> ApiError {
    ApiError::bad(format!(
        "Could not create the network device: Open tap device failed: Error while creating \
         ifreq structure: {io}. Invalid TUN/TAP Backend provided by {name}. Check our \
         documentation on setting up the network devices. ({detail})"
    ))
}

impl ApiError {
    /// The HTTP status code of the response carrying this error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_)
            | ApiError::Unsupported(_)
            | ApiError::NotSupportedPreBoot
            | ApiError::NotSupportedPostBoot => 400,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::Internal(_) => 500,
        }
    }

    /// Shorthand for a `BadRequest` with a formatted message.
    pub fn bad(msg: impl Into<String>) -> Self {
        ApiError::BadRequest(msg.into())
    }
}
