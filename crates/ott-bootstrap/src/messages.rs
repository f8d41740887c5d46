//! The messages exchanged with the bootstrapper.

use std::net::{IpAddr, SocketAddr};

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

/// Another overlay node: where the asking node should send to reach it, and every
/// address it has.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Peer {
    /// Its id.
    pub id: NodeId,
    /// Its control socket, at the address on the way from the asking node (the one to
    /// send to).
    pub ctrl: SocketAddr,
    /// Its data (media) socket, at the same address.
    pub data: SocketAddr,
    /// Every address of the node, the one it is known by first (its control socket is
    /// on the `ctrl` port of each): it may send from any of them, and datagrams from
    /// these addresses, and from no other, are the node's.
    #[serde(default)]
    pub addrs: Vec<IpAddr>,
}

impl Peer {
    /// The peer's addresses for the neighbour table or the client: send to `ctrl`;
    /// every address (`ctrl`'s port on each of `addrs`) is the peer's.
    pub fn control_addrs(&self) -> ott_overlay::PeerAddrs {
        ott_overlay::peer_addrs(&self.id, self.ctrl, &self.addrs)
    }
}

/// Everything a program needs to start: who it is, where to bind, who to talk to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The program's id ([`ANONYMOUS_CLIENT_ID`] for an anonymous client).
    pub id: NodeId,
    /// Its role.
    pub role: Role,
    /// Where it binds its control socket: `node ip:7000` in the loopback plan (its first
    /// address), `0.0.0.0:7000` in the links plan; clients get port 0 (an ephemeral
    /// port). A node bound to a specific address binds its control port on each of its
    /// other `addresses` too; one bound to `0.0.0.0` answers each request from the
    /// address it was sent to.
    pub bind_ctrl: SocketAddr,
    /// Where it binds its data socket (`:7001`, on the first address only; clients: the
    /// same as `bind_ctrl`).
    pub bind_data: SocketAddr,
    /// Every address of the program, the one it is known by first (as its peers are
    /// told in [`Peer::addrs`]); empty for an anonymous client.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
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
