//! The bootstrapper (SPEC §4): tells each node who it is and who its neighbours are.
//!
//! A node (or client) opens a TCP connection to the bootstrapper, sends a [`Request`]
//! with its id and gets back a [`Response`]: either an [`Assignment`] (its role, where to
//! bind its sockets, its overlay neighbours and every PoP, with addresses as seen from
//! it) or a refusal with a readable reason. Addresses come from the topology file and
//! an [`AddressPlan`](ott_overlay::AddressPlan).
//!
//! # Layout
//! - [`Service::answer`] is the pure part: a request in, a response out.
//! - [`Service::serve`] runs it on a bound [`std::net::TcpListener`]: a thread per
//!   connection, a deadline for each whole request, caps on connections in all and per
//!   source address (the oldest is closed to make room), counters ([`Service::stats`]).
//! - [`request`] / [`request_until`] are the client side; [`request_keyed`] /
//!   [`request_until_keyed`] tag the request with the overlay key and accept only an
//!   answer tagged for it ([`keyed`]).
//! - [`write_frame`] / [`read_frame`] are the framing both sides use: a `u32` big-endian
//!   length, then a MessagePack (`rmp-serde`) body of at most [`MAX_FRAME_LEN`] bytes.
//!
//! Unlike the protocol crates this crate does I/O (TCP, threads, sleeps in the accept
//! loop and between retries). It holds no overlay state: once a node has its
//! assignment it never needs the bootstrapper again, until it restarts.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod error;
pub mod keyed;
mod messages;
mod service;
mod wire;

pub use client::{request, request_keyed, request_until, request_until_keyed, RETRY_INTERVAL};
pub use error::BootstrapError;
pub use messages::{Assignment, Peer, Request, Response, ANONYMOUS_CLIENT_ID};
pub use service::{
    Service, ServiceStats, DEFAULT_IO_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PER_ADDR,
    MAX_REQUESTS_PER_CONNECTION,
};
pub use wire::{read_frame, read_frame_body, write_frame, MAX_FRAME_LEN};
