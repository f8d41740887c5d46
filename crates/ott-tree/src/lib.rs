//! The distribution tree of the OTT overlay (crate doc to be written by the tree's author).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub use client::{Client, ClientConfig, ClientEvent, ClientStatus};
// Helper C adds: mod node; pub mod sim; and the re-exports.
