//! The messages exchanged with the bootstrapper.

use std::net::SocketAddr;

use ott_overlay::Role;
use ott_proto::NodeId;
use serde::{Deserialize, Serialize};

/// The id given to an anonymous client in its [`Assignment`].
pub const ANONYMOUS_CLIENT_ID: &str = "client";

/// What a program asks the bootstrapper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// An overlay node (server, relay or pop) asks for its assignment.
    Node {
        /// The node's id in the topology.
        id: NodeId,
    },
    /// A client asks for the PoP list; with an id when it is a client node of the
    /// topology, without one when it is anonymous.
    Client {
        /// The client's id in the topology, if it has one.
        id: Option<NodeId>,
    },
}

/// Another overlay node, with its addresses as seen from the asking node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Peer {
    /// Its id.
    pub id: NodeId,
    /// Its control socket.
    pub ctrl: SocketAddr,
    /// Its data (media) socket.
    pub data: SocketAddr,
}

/// Everything a program needs to start: who it is, where to bind, who to talk to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The program's id ([`ANONYMOUS_CLIENT_ID`] for an anonymous client).
    pub id: NodeId,
    /// Its role.
    pub role: Role,
    /// Where it binds its control socket: `node ip:7000` in the loopback plan, `0.0.0.0:7000`
    /// in the links plan; clients get port 0 (an ephemeral port).
    pub bind_ctrl: SocketAddr,
    /// Where it binds its data socket (`:7001`; clients: the same as `bind_ctrl`).
    pub bind_data: SocketAddr,
    /// Its overlay neighbours, sorted by id (empty for clients).
    pub neighbours: Vec<Peer>,
    /// Every PoP of the topology, in file order.
    pub pops: Vec<Peer>,
    /// The topology's name.
    pub topology: String,
}

/// The bootstrapper's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The request was accepted.
    Assigned(Assignment),
    /// The request was refused; `reason` is meant for people.
    Refused {
        /// Why.
        reason: String,
    },
}
