//! Errors of the bootstrap client and framing.

use std::io;

/// Why a bootstrap exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// Connecting, reading or writing failed (including timeouts and a peer that closed).
    #[error("bootstrap connection failed: {0}")]
    Io(#[from] io::Error),
    /// The bootstrapper answered with a refusal; the reason is meant for people.
    #[error("bootstrapper refused: {0}")]
    Refused(String),
    /// The overlay key check failed: an untagged or wrongly tagged answer, or a tagged
    /// one without a key to check it.
    #[error("bootstrap answer refused: {0}")]
    Auth(String),
    /// A frame's body is not a valid message.
    #[error("malformed bootstrap message: {0}")]
    Malformed(String),
    /// A frame is longer than [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN); it is never read
    /// (or, when sending, never written).
    #[error("bootstrap message too long: {0} bytes (at most {max})", max = crate::MAX_FRAME_LEN)]
    TooLong(usize),
}
