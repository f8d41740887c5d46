//! Topology files and their validation, the address plan, and neighbour tables with
//! liveness and RTT.
//!
//! This crate is sans-IO: it opens no sockets, spawns no threads and never reads the
//! clock (the one exception is [`Topology::load`], which reads a file). Callers pass the
//! current time in and own every socket.
#![deny(unsafe_code)]
#![warn(missing_docs)]
pub mod addr;
mod error;
pub mod hint;
pub mod neighbours;
pub mod topology;
pub use addr::{peer_addrs, AddressPlan, Endpoint, PeerAddrs, CONTROL_PORT, DATA_PORT};
pub use error::{TopologyError, TopologyProblem};
pub use neighbours::{ControlTransmit, LivenessConfig, NeighbourEvent, NeighbourInfo, Neighbours};
pub use topology::{Link, NodeSpec, Role, Topology};
