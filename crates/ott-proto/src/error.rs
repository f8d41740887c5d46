//! Error types of the codecs.

/// Why a control datagram could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The datagram is larger than [`crate::MAX_CONTROL_LEN`].
    #[error("control datagram of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// Length of the datagram.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The datagram is empty.
    #[error("empty control datagram")]
    Empty,
    /// The envelope names a protocol version this build does not speak.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// The body is not a valid MessagePack encoding of a message.
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// Bytes were left over after the message.
    #[error("{0} trailing bytes after control message")]
    Trailing(usize),
}

/// Why a control message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The serializer failed (should not happen for well-formed values).
    #[error("cannot encode control message: {0}")]
    Serialize(String),
    /// The encoded message would not fit a datagram.
    #[error("encoded control message of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// Encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Why a media datagram header could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer bytes than a header.
    #[error("media datagram of {0} bytes is shorter than the header")]
    Short(usize),
    /// The first two bytes are not `OT`.
    #[error("bad media magic {0:#06x}")]
    Magic(u16),
    /// Unknown header version.
    #[error("unsupported media header version {0}")]
    Version(u8),
    /// Fragment index not below fragment count, or count zero.
    #[error("bad fragment {index}/{count}")]
    Fragment {
        /// Fragment index.
        index: u16,
        /// Fragment count.
        count: u16,
    },
    /// Datagram longer than [`crate::MAX_DATAGRAM_LEN`].
    #[error("media datagram of {0} bytes exceeds the MTU budget")]
    TooLong(usize),
}
