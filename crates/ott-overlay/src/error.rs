//! Errors of topology loading and validation.

use std::fmt;
use std::path::PathBuf;

/// A topology file that could not be read or was refused.
///
/// Its `Display` names the file, the 1-based line when the problem sits on one, and the
/// problem, e.g. `topologies/x.toml:12: link refers to unknown node "n99"`.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The file could not be read.
    #[error("{}: cannot read topology file: {source}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but its content is refused.
    #[error("{origin}{}: {problem}", LineSuffix(*line))]
    Invalid {
        /// Where the text came from (a file name), as given to [`crate::Topology::parse`].
        origin: String,
        /// 1-based line of the offending item, or `None` when the problem concerns the
        /// whole file (for example "no server").
        line: Option<usize>,
        /// What is wrong.
        problem: TopologyProblem,
    },
}

impl TopologyError {
    /// The problem, when the file was read but refused.
    pub fn problem(&self) -> Option<&TopologyProblem> {
        match self {
            Self::Read { .. } => None,
            Self::Invalid { problem, .. } => Some(problem),
        }
    }

    /// The 1-based line the problem sits on, if it sits on one.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Read { .. } => None,
            Self::Invalid { line, .. } => *line,
        }
    }
}

/// Formats `:LINE` or nothing.
struct LineSuffix(Option<usize>);

impl fmt::Display for LineSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, ":{line}"),
            None => Ok(()),
        }
    }
}

/// What is wrong with a topology file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyProblem {
    /// The text is not valid TOML, or does not have the expected shape (missing or
    /// unknown key, wrong type).
    #[error("{0}")]
    Syntax(String),
    /// A node's `role` is not one of the five roles.
    #[error("unknown role \"{0}\" (expected server, relay, pop, router or client)")]
    UnknownRole(String),
    /// A node's `id` is empty.
    #[error("node id is empty")]
    EmptyId,
    /// A node's `id` holds a character other than letters, digits, `-`, `_` and `.`.
    #[error("node id \"{0}\" may only hold letters, digits, '-', '_' and '.'")]
    BadId(String),
    /// Two nodes share an id.
    #[error("duplicate node id \"{id}\" (first defined on line {first_line})")]
    DuplicateNode {
        /// The repeated id.
        id: String,
        /// Line of the first definition.
        first_line: usize,
    },
    /// A node's `address` (or one of its `addresses`) is not a unicast IPv4 address.
    #[error(
        "node \"{id}\" has an invalid address \"{address}\" (expected a unicast IPv4 address)"
    )]
    BadAddress {
        /// The node.
        id: String,
        /// The text given.
        address: String,
    },
    /// A node gives both `address` and `addresses`.
    #[error("node \"{0}\" has both address and addresses: give one of them")]
    AddressAndAddresses(String),
    /// A node's `addresses` list is empty.
    #[error("node \"{0}\" has an empty addresses list (leave it out to derive the address)")]
    EmptyAddresses(String),
    /// A node lists the same address twice.
    #[error("node \"{id}\" lists address {address} twice")]
    RepeatedAddress {
        /// The node.
        id: String,
        /// The repeated address.
        address: std::net::Ipv4Addr,
    },
    /// Two nodes give the same address.
    #[error("node \"{id}\" has the same address {address} as node \"{other}\"")]
    DuplicateAddress {
        /// The second node.
        id: String,
        /// The first node.
        other: String,
        /// The shared address.
        address: std::net::Ipv4Addr,
    },
    /// A `[[link]]` names a node that does not exist.
    #[error("link refers to unknown node \"{0}\"")]
    LinkUnknownNode(String),
    /// A `[[link]]` joins a node to itself.
    #[error("link joins node \"{0}\" to itself")]
    SelfLink(String),
    /// Two `[[link]]`s join the same two nodes.
    #[error("duplicate link between \"{a}\" and \"{b}\" (first defined on line {first_line})")]
    DuplicateLink {
        /// One end.
        a: String,
        /// The other end.
        b: String,
        /// Line of the first definition.
        first_line: usize,
    },
    /// A link parameter is negative, not finite, or out of range.
    #[error("link parameter {name} = {value} is invalid: {expected}")]
    BadLinkParameter {
        /// The key, e.g. `delay_ms`.
        name: &'static str,
        /// The value given.
        value: f64,
        /// What is accepted.
        expected: &'static str,
    },
    /// An `[[overlay]]` pair names a node that does not exist.
    #[error("overlay pair refers to unknown node \"{0}\"")]
    OverlayUnknownNode(String),
    /// An `[[overlay]]` pair joins a node to itself.
    #[error("overlay pair joins node \"{0}\" to itself")]
    SelfOverlay(String),
    /// Two `[[overlay]]` pairs name the same two nodes.
    #[error("duplicate overlay pair \"{a}\" - \"{b}\" (first defined on line {first_line})")]
    DuplicateOverlay {
        /// One end.
        a: String,
        /// The other end.
        b: String,
        /// Line of the first definition.
        first_line: usize,
    },
    /// An `[[overlay]]` pair names a router or a client, which run no overlay process.
    #[error("overlay pair names {role} \"{id}\": only servers, relays and pops are overlay nodes")]
    OverlayNotOverlayNode {
        /// The node.
        id: String,
        /// Its role.
        role: crate::Role,
    },
    /// The two ends of an `[[overlay]]` pair are not joined by any chain of links.
    #[error("overlay pair \"{a}\" - \"{b}\" is not connected by any path of links")]
    OverlayNotConnected {
        /// One end.
        a: String,
        /// The other end.
        b: String,
    },
    /// The file has no node with role `server`.
    #[error("topology has no server (at least one node needs role = \"server\")")]
    NoServer,
    /// `bootstrapper` names a node that does not exist.
    #[error("bootstrapper \"{0}\" is not a node of the topology")]
    UnknownBootstrapper(String),
    /// A pop or relay cannot reach any server through the overlay.
    #[error("{role} \"{id}\" has no overlay path to a server")]
    NoPathToServer {
        /// The node.
        id: String,
        /// Its role (pop or relay).
        role: crate::Role,
    },
}
