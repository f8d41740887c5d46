//! Wire formats of the OTT overlay.
//!
//! Two planes, two formats:
//! - **control** ([`Message`]): small typed messages (heartbeats, announcements, joins,
//!   probes, NACKs) encoded with MessagePack (`rmp-serde`) inside a versioned
//!   [`Envelope`]. [`decode`] refuses anything larger than [`MAX_CONTROL_LEN`], a wrong
//!   version or a malformed body with a typed [`DecodeError`]; it never panics.
//! - **media** ([`MediaHeader`]): a fixed 24-byte binary header in front of each media
//!   datagram, so that a relay forwards the bytes after reading only the header.
//!
//! - **authentication** ([`auth`]): with a shared overlay key, tags on control and media
//!   datagrams between overlay members, and replay windows for control messages.
//!
//! This crate performs no I/O and reads no clock: it only turns values into bytes and back.
//! It is the only crate that knows the wire encoding.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
mod control;
mod error;
mod media;
pub mod report;
mod untrusted;

pub use control::{
    decode, encode, encode_into, request_padding, stream_id_for, Envelope, MediaKind, Message,
    NackRange, NodeId, StreamId, StreamInfo, MAX_AVOID, MAX_CONTROL_LEN, MAX_PROBE_PATH_BYTES,
    PROTOCOL_VERSION,
};
pub use error::{DecodeError, EncodeError, HeaderError};
pub use media::{
    flags, older, MediaHeader, HEADER_LEN, MAGIC, MAX_DATAGRAM_LEN, MAX_PAYLOAD_LEN, MEDIA_VERSION,
};
pub use untrusted::{untrusted, Untrusted, MAX_LOGGED_CHARS};
