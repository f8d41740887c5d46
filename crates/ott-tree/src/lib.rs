//! The distribution tree of the OTT overlay (SPEC §5), as sans-IO state machines.
//!
//! - [`Node`]: one overlay node (server, relay or PoP). Servers announce themselves and
//!   their catalogue every period; announcements flood outward carrying the path taken
//!   and the accumulated latency (each link's latency is half its heartbeat RTT, measured
//!   by [`ott_overlay::Neighbours`]). Each node picks, per server, the neighbour offering
//!   the lowest latency then fewest hops, never one whose path holds itself, with
//!   hysteresis, and fails over at once when its parent dies, says bye, withdraws or goes
//!   stale. Children (nodes and clients) subscribe to streams with soft-state `Join`s; a
//!   node is joined upstream only while it has children (pruning), and on a parent change
//!   it joins at the new parent before leaving the old one. The result for the data plane
//!   is [`Event::Forwarding`]: the set of data addresses each stream goes to.
//! - [`Client`] (module [`client`]): a viewer's choice of PoP and stream.
//! - [`sim`]: a deterministic discrete-event network that runs many nodes and clients
//!   over simulated links, each with the real data plane (`ott-datapath`, `ott-media`)
//!   beside it, for tests and `cargo xtask sim`.
//!
//! # Driving a state machine
//!
//! Nothing here opens a socket, spawns a thread or reads the clock: `now` is always a
//! parameter, randomness comes from a seed in the config, and outputs are queued. The
//! caller decodes datagrams with `ott_proto::decode` and feeds them to `handle`, and
//! follows the **drain rule**: after `new` and after each `handle*` call or command
//! (`set_catalogue`, `shutdown`, ...), drain `poll_transmit` (encode and send each one)
//! and `poll_event`, then read `poll_timeout` and call `handle_timeout` when it is
//! reached. See `examples/embed.rs`.
//!
//! The state machines do not move media: they only tell the data plane where each stream
//! goes (the simulator runs that data plane too).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
mod node;
// The simulator reads the clock once, for an arbitrary origin of its virtual time, and
// steps the parts of a run on scoped threads (`Sim::threads`); the state machines it
// runs do neither.
#[allow(clippy::disallowed_methods)]
pub mod sim;

pub use client::{Client, ClientConfig, ClientEvent, ClientStatus};
pub use node::{
    Event, NeighbourStatus, Node, NodeConfig, NodeStats, NodeStatus, RouteStatus, StreamStatus,
};
pub use ott_overlay::{ControlTransmit, Role};
