//! Topology files (SPEC §3): nodes, links and the overlay on top of them.
//!
//! One TOML file describes the underlay (every node and link) and, optionally, the
//! overlay neighbour pairs. Every tool (bootstrapper, demo, namespace emulation, CORE
//! export) reads it through [`Topology::load`] / [`Topology::parse`], which refuse a bad
//! file with a message naming the file, the line and the problem.
//!
//! ```toml
//! name = "seed"
//! bootstrapper = "s1"
//! [[node]]
//! id = "s1"
//! role = "server"          # server | relay | pop | router | client
//! address = "10.9.9.9"     # optional override (see the addr module), or several:
//! # addresses = ["10.9.9.9", "192.0.2.7"]   # a host with more than one address
//! [[link]]
//! ends = ["s1", "n12"]
//! delay_ms = 2.0           # optional, default 0
//! jitter_ms = 0.0          # optional, default 0
//! rate_mbit = 100.0        # optional, default none (unlimited)
//! loss_pct = 0.0           # optional, default 0
//! [[overlay]]              # optional: explicit overlay neighbour pairs
//! ends = ["n12", "n5"]
//! ```

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::{TopologyError, TopologyProblem};

/// What a node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Holds the videos and roots the distribution trees.
    Server,
    /// A CDN core node: forwards streams inside the overlay.
    Relay,
    /// A point of presence: a relay at the edge where clients attach.
    Pop,
    /// Runs no overlay process; only forwards IP in emulation.
    Router,
    /// A viewer host.
    Client,
}

impl Role {
    /// All roles, in declaration order.
    pub const ALL: [Self; 5] = [
        Self::Server,
        Self::Relay,
        Self::Pop,
        Self::Router,
        Self::Client,
    ];

    /// Whether nodes of this role run an overlay process (server, relay or pop).
    pub fn is_overlay(self) -> bool {
        matches!(self, Self::Server | Self::Relay | Self::Pop)
    }

    /// The lowercase name used in topology files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Relay => "relay",
            Self::Pop => "pop",
            Self::Router => "router",
            Self::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of `server`, `relay`, `pop`, `router`, `client`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role \"{0}\" (expected server, relay, pop, router or client)")]
pub struct ParseRoleError(pub String);

impl FromStr for Role {
    type Err = ParseRoleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| ParseRoleError(s.to_owned()))
    }
}

/// One node of the topology.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    /// Unique id (letters, digits, `-`, `_`, `.`).
    pub id: String,
    /// What the node does.
    pub role: Role,
    /// Addresses given in the file (`address = "…"` or `addresses = ["…", …]`), in
    /// file order; they override the derived address in every plan (see the
    /// [`addr`](crate::addr) module). Empty when the file gives none.
    pub addresses: Vec<Ipv4Addr>,
    /// 1-based line of the node's `id` in the file.
    pub line: usize,
}

/// One underlay link, with the parameters emulation applies to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    /// The two node ids it joins; `ends[0]` gets `.1` and `ends[1]` gets `.2` on the
    /// link's subnet in the links address plan.
    pub ends: [String; 2],
    /// One-way delay in milliseconds (default 0).
    pub delay_ms: f64,
    /// Delay jitter in milliseconds (default 0).
    pub jitter_ms: f64,
    /// Rate limit in Mbit/s; `None` is unlimited.
    pub rate_mbit: Option<f64>,
    /// Random loss in percent, 0 to 100 (default 0).
    pub loss_pct: f64,
    /// 1-based line of the link's `ends` in the file.
    pub line: usize,
}

impl Link {
    /// Whether the link has `id` as one of its ends.
    pub fn touches(&self, id: &str) -> bool {
        self.ends[0] == id || self.ends[1] == id
    }

    /// The end that is not `id`, if `id` is an end.
    pub fn other_end(&self, id: &str) -> Option<&str> {
        if self.ends[0] == id {
            Some(&self.ends[1])
        } else if self.ends[1] == id {
            Some(&self.ends[0])
        } else {
            None
        }
    }
}

/// A validated topology: nodes, links, and optionally explicit overlay pairs.
///
/// Built by [`Topology::load`] or [`Topology::parse`], which guarantee: unique non-empty
/// ids, links and overlay pairs naming existing distinct nodes with no duplicates, sane
/// link parameters, at least one server, an existing bootstrapper, overlay pairs only
/// between overlay nodes, and an overlay path from every relay and pop to a server.
/// Address helpers live in the [`addr`](crate::addr) module.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// The topology's name (`name = ...`).
    pub name: String,
    /// Id of the node that hosts the bootstrapper.
    pub bootstrapper: String,
    /// Every node, in file order.
    pub nodes: Vec<NodeSpec>,
    /// Every link, in file order; a link's index is its position here.
    pub links: Vec<Link>,
    /// Explicit overlay neighbour pairs, if the file has `[[overlay]]` entries.
    pub overlay: Option<Vec<[String; 2]>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    name: String,
    bootstrapper: Spanned<String>,
    #[serde(default)]
    node: Vec<RawNode>,
    #[serde(default)]
    link: Vec<RawLink>,
    overlay: Option<Vec<RawOverlay>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: Spanned<String>,
    role: Spanned<String>,
    address: Option<Spanned<String>>,
    addresses: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLink {
    ends: Spanned<[String; 2]>,
    delay_ms: Option<Spanned<f64>>,
    jitter_ms: Option<Spanned<f64>>,
    rate_mbit: Option<Spanned<f64>>,
    loss_pct: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverlay {
    ends: Spanned<[String; 2]>,
}

/// Converts byte offsets into 1-based lines and builds errors for one text.
struct Ctx<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let upto = self.text.get(..offset).unwrap_or(self.text);
        upto.bytes().filter(|&b| b == b'\n').count() + 1
    }

    fn at(&self, offset: usize, problem: TopologyProblem) -> TopologyError {
        TopologyError::Invalid {
            origin: self.origin.to_owned(),
            line: Some(self.line_of(offset)),
            problem,
        }
    }

    fn line(&self, line: usize, problem: TopologyProblem) -> TopologyError {
        TopologyError::Invalid {
            origin: self.origin.to_owned(),
            line: Some(line),
            problem,
        }
    }

    fn whole(&self, problem: TopologyProblem) -> TopologyError {
        TopologyError::Invalid {
            origin: self.origin.to_owned(),
            line: None,
            problem,
        }
    }
}

fn valid_id(id: &str) -> bool {
    id.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Unordered key of a pair of ids.
fn pair_key(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

fn link_param(
    ctx: &Ctx<'_>,
    value: Option<Spanned<f64>>,
    name: &'static str,
    max: Option<(f64, &'static str)>,
) -> Result<Option<f64>, TopologyError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let v = *value.get_ref();
    let expected = if !v.is_finite() {
        Some("must be a finite number")
    } else if v < 0.0 {
        Some("must not be negative")
    } else {
        max.and_then(|(max, expected)| (v > max).then_some(expected))
    };
    match expected {
        Some(expected) => Err(ctx.at(
            value.span().start,
            TopologyProblem::BadLinkParameter {
                name,
                value: v,
                expected,
            },
        )),
        None => Ok(Some(v)),
    }
}

impl Topology {
    /// Reads and parses a topology file; errors name the file as given.
    // The one file read of the protocol crates: a convenience for the programs and xtask,
    // never called by the protocol itself ([`Topology::parse`] is the sans-IO entry).
    #[allow(clippy::disallowed_methods)]
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates a topology from TOML text; `origin` (usually the file name)
    /// starts every error message.
    pub fn parse(text: &str, origin: &str) -> Result<Self, TopologyError> {
        let ctx = Ctx { text, origin };
        let raw: RawTopology = toml::from_str(text).map_err(|e| {
            let problem = TopologyProblem::Syntax(e.message().trim().to_owned());
            match e.span() {
                Some(span) => ctx.at(span.start, problem),
                None => ctx.whole(problem),
            }
        })?;

        // Nodes.
        let mut nodes = Vec::with_capacity(raw.node.len());
        let mut first_line: HashMap<String, usize> = HashMap::new();
        let mut addresses: HashMap<Ipv4Addr, String> = HashMap::new();
        for n in raw.node {
            let line = ctx.line_of(n.id.span().start);
            let id = n.id.into_inner();
            if id.is_empty() {
                return Err(ctx.line(line, TopologyProblem::EmptyId));
            }
            if !valid_id(&id) {
                return Err(ctx.line(line, TopologyProblem::BadId(id)));
            }
            if let Some(&first) = first_line.get(&id) {
                return Err(ctx.line(
                    line,
                    TopologyProblem::DuplicateNode {
                        id,
                        first_line: first,
                    },
                ));
            }
            let role_at = n.role.span().start;
            let role: Role =
                n.role.get_ref().parse().map_err(|ParseRoleError(r)| {
                    ctx.at(role_at, TopologyProblem::UnknownRole(r))
                })?;
            let given: Vec<Spanned<String>> = match (n.address, n.addresses) {
                (Some(_), Some(list)) => {
                    return Err(ctx.at(list.span().start, TopologyProblem::AddressAndAddresses(id)))
                }
                (Some(a), None) => vec![a],
                (None, Some(list)) => {
                    let at = list.span().start;
                    let list = list.into_inner();
                    if list.is_empty() {
                        return Err(ctx.at(at, TopologyProblem::EmptyAddresses(id)));
                    }
                    list
                }
                (None, None) => Vec::new(),
            };
            let mut own: Vec<Ipv4Addr> = Vec::with_capacity(given.len());
            for a in given {
                let at = a.span().start;
                let ip: Ipv4Addr = a.get_ref().parse().map_err(|_| {
                    ctx.at(
                        at,
                        TopologyProblem::BadAddress {
                            id: id.clone(),
                            address: a.get_ref().clone(),
                        },
                    )
                })?;
                if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
                    return Err(ctx.at(
                        at,
                        TopologyProblem::BadAddress {
                            id: id.clone(),
                            address: a.get_ref().clone(),
                        },
                    ));
                }
                if own.contains(&ip) {
                    return Err(ctx.at(
                        at,
                        TopologyProblem::RepeatedAddress {
                            id: id.clone(),
                            address: ip,
                        },
                    ));
                }
                if let Some(other) = addresses.get(&ip) {
                    return Err(ctx.at(
                        at,
                        TopologyProblem::DuplicateAddress {
                            id,
                            other: other.clone(),
                            address: ip,
                        },
                    ));
                }
                own.push(ip);
            }
            for &ip in &own {
                addresses.insert(ip, id.clone());
            }
            first_line.insert(id.clone(), line);
            nodes.push(NodeSpec {
                id,
                role,
                addresses: own,
                line,
            });
        }
        let role_of: HashMap<&str, Role> = nodes.iter().map(|n| (n.id.as_str(), n.role)).collect();

        // Links.
        let mut links = Vec::with_capacity(raw.link.len());
        let mut seen_links: HashMap<(String, String), usize> = HashMap::new();
        for l in raw.link {
            let line = ctx.line_of(l.ends.span().start);
            let ends = l.ends.into_inner();
            for end in &ends {
                if !role_of.contains_key(end.as_str()) {
                    return Err(ctx.line(line, TopologyProblem::LinkUnknownNode(end.clone())));
                }
            }
            let [a, b] = &ends;
            if a == b {
                return Err(ctx.line(line, TopologyProblem::SelfLink(a.clone())));
            }
            if let Some(&first) = seen_links.get(&pair_key(a, b)) {
                return Err(ctx.line(
                    line,
                    TopologyProblem::DuplicateLink {
                        a: a.clone(),
                        b: b.clone(),
                        first_line: first,
                    },
                ));
            }
            seen_links.insert(pair_key(a, b), line);
            let delay_ms = link_param(&ctx, l.delay_ms, "delay_ms", None)?.unwrap_or(0.0);
            let jitter_ms = link_param(&ctx, l.jitter_ms, "jitter_ms", None)?.unwrap_or(0.0);
            let rate_mbit = match link_param(&ctx, l.rate_mbit.clone(), "rate_mbit", None)? {
                Some(r) if r == 0.0 => {
                    let at = l.rate_mbit.map_or(0, |s| s.span().start);
                    return Err(ctx.at(
                        at,
                        TopologyProblem::BadLinkParameter {
                            name: "rate_mbit",
                            value: r,
                            expected: "must be positive (leave it out for unlimited)",
                        },
                    ));
                }
                other => other,
            };
            let loss_pct = link_param(
                &ctx,
                l.loss_pct,
                "loss_pct",
                Some((100.0, "must be at most 100")),
            )?
            .unwrap_or(0.0);
            links.push(Link {
                ends,
                delay_ms,
                jitter_ms,
                rate_mbit,
                loss_pct,
                line,
            });
        }

        // Explicit overlay pairs.
        let mut overlay_lines = Vec::new();
        let overlay = match raw.overlay {
            None => None,
            Some(pairs) => {
                let mut out = Vec::with_capacity(pairs.len());
                let mut seen: HashMap<(String, String), usize> = HashMap::new();
                for p in pairs {
                    let line = ctx.line_of(p.ends.span().start);
                    let ends = p.ends.into_inner();
                    for end in &ends {
                        match role_of.get(end.as_str()) {
                            None => {
                                return Err(ctx
                                    .line(line, TopologyProblem::OverlayUnknownNode(end.clone())))
                            }
                            Some(&role) if !role.is_overlay() => {
                                return Err(ctx.line(
                                    line,
                                    TopologyProblem::OverlayNotOverlayNode {
                                        id: end.clone(),
                                        role,
                                    },
                                ))
                            }
                            Some(_) => {}
                        }
                    }
                    let [a, b] = &ends;
                    if a == b {
                        return Err(ctx.line(line, TopologyProblem::SelfOverlay(a.clone())));
                    }
                    if let Some(&first) = seen.get(&pair_key(a, b)) {
                        return Err(ctx.line(
                            line,
                            TopologyProblem::DuplicateOverlay {
                                a: a.clone(),
                                b: b.clone(),
                                first_line: first,
                            },
                        ));
                    }
                    seen.insert(pair_key(a, b), line);
                    overlay_lines.push(line);
                    out.push(ends);
                }
                Some(out)
            }
        };

        let topo = Self {
            name: raw.name,
            bootstrapper: raw.bootstrapper.get_ref().clone(),
            nodes,
            links,
            overlay,
        };

        if topo.servers().is_empty() {
            return Err(ctx.whole(TopologyProblem::NoServer));
        }
        if topo.node(&topo.bootstrapper).is_none() {
            return Err(ctx.at(
                raw.bootstrapper.span().start,
                TopologyProblem::UnknownBootstrapper(topo.bootstrapper.clone()),
            ));
        }
        topo.check_overlay_connected(&ctx, &overlay_lines)?;
        topo.check_paths_to_servers(&ctx)?;
        Ok(topo)
    }

    /// Every explicit overlay pair must be joined by some chain of underlay links.
    /// `lines[i]` is the line of pair `i`.
    fn check_overlay_connected(&self, ctx: &Ctx<'_>, lines: &[usize]) -> Result<(), TopologyError> {
        let Some(pairs) = &self.overlay else {
            return Ok(());
        };
        let component = self.underlay_components();
        for (i, [a, b]) in pairs.iter().enumerate() {
            if component.get(a.as_str()) != component.get(b.as_str()) {
                let problem = TopologyProblem::OverlayNotConnected {
                    a: a.clone(),
                    b: b.clone(),
                };
                return Err(match lines.get(i) {
                    Some(&line) => ctx.line(line, problem),
                    None => ctx.whole(problem),
                });
            }
        }
        Ok(())
    }

    /// Connected-component number of every node in the underlay graph.
    fn underlay_components(&self) -> HashMap<&str, usize> {
        let mut adj: HashMap<&str, Vec<&str>> = HashMap::new();
        for l in &self.links {
            adj.entry(&l.ends[0]).or_default().push(&l.ends[1]);
            adj.entry(&l.ends[1]).or_default().push(&l.ends[0]);
        }
        let mut comp: HashMap<&str, usize> = HashMap::new();
        for (c, n) in self.nodes.iter().enumerate() {
            if comp.contains_key(n.id.as_str()) {
                continue;
            }
            let mut queue = VecDeque::from([n.id.as_str()]);
            comp.insert(&n.id, c);
            while let Some(x) = queue.pop_front() {
                for &y in adj.get(x).map(Vec::as_slice).unwrap_or(&[]) {
                    if comp.insert(y, c).is_none() {
                        queue.push_back(y);
                    }
                }
            }
        }
        comp
    }

    /// Every relay and pop must reach a server through the overlay.
    fn check_paths_to_servers(&self, ctx: &Ctx<'_>) -> Result<(), TopologyError> {
        let adj = self.overlay_adjacency();
        let mut reached: BTreeSet<&str> = BTreeSet::new();
        let mut queue: VecDeque<&str> = VecDeque::new();
        for s in self.servers() {
            reached.insert(&s.id);
            queue.push_back(&s.id);
        }
        while let Some(x) = queue.pop_front() {
            for &y in adj.get(x).map(Vec::as_slice).unwrap_or(&[]) {
                if reached.insert(y) {
                    queue.push_back(y);
                }
            }
        }
        // Pops first: they are what clients need, so name them before relays.
        for role in [Role::Pop, Role::Relay] {
            if let Some(n) = self
                .nodes
                .iter()
                .find(|n| n.role == role && !reached.contains(n.id.as_str()))
            {
                return Err(ctx.line(
                    n.line,
                    TopologyProblem::NoPathToServer {
                        id: n.id.clone(),
                        role,
                    },
                ));
            }
        }
        Ok(())
    }

    /// Overlay adjacency lists (unsorted, may hold duplicates only if the input did).
    fn overlay_adjacency(&self) -> HashMap<&str, Vec<&str>> {
        let mut adj: HashMap<&str, Vec<&str>> = HashMap::new();
        let pairs: Vec<(&str, &str)> = match &self.overlay {
            Some(pairs) => pairs
                .iter()
                .map(|[a, b]| (a.as_str(), b.as_str()))
                .collect(),
            None => {
                let overlay_nodes: HashSet<&str> = self
                    .nodes
                    .iter()
                    .filter(|n| n.role.is_overlay())
                    .map(|n| n.id.as_str())
                    .collect();
                self.links
                    .iter()
                    .map(|l| (l.ends[0].as_str(), l.ends[1].as_str()))
                    .filter(|(a, b)| overlay_nodes.contains(a) && overlay_nodes.contains(b))
                    .collect()
            }
        };
        for (a, b) in pairs {
            adj.entry(a).or_default().push(b);
            adj.entry(b).or_default().push(a);
        }
        adj
    }

    /// The node with this id.
    pub fn node(&self, id: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Position of the node with this id in [`Topology::nodes`].
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// Overlay neighbours of `id`: the explicit `[[overlay]]` pairs if the file has any,
    /// else the other ends of links whose both ends are overlay nodes (server, relay,
    /// pop). Sorted and deduplicated; empty for an unknown id or a router/client.
    pub fn overlay_neighbours(&self, id: &str) -> Vec<String> {
        let set: BTreeSet<&str> = self
            .overlay_adjacency()
            .remove(id)
            .unwrap_or_default()
            .into_iter()
            .collect();
        set.into_iter().map(str::to_owned).collect()
    }

    /// Nodes with a given role, in file order.
    pub fn with_role(&self, role: Role) -> Vec<&NodeSpec> {
        self.nodes.iter().filter(|n| n.role == role).collect()
    }

    /// Every server, in file order.
    pub fn servers(&self) -> Vec<&NodeSpec> {
        self.with_role(Role::Server)
    }

    /// Every pop, in file order.
    pub fn pops(&self) -> Vec<&NodeSpec> {
        self.with_role(Role::Pop)
    }

    /// Every client, in file order.
    pub fn clients(&self) -> Vec<&NodeSpec> {
        self.with_role(Role::Client)
    }

    /// The link joining `a` and `b` (in either direction) and its index.
    pub fn link_between(&self, a: &str, b: &str) -> Option<(usize, &Link)> {
        self.links
            .iter()
            .enumerate()
            .find(|(_, l)| l.touches(a) && l.other_end(a) == Some(b))
    }

    /// Links that have `id` as an end, with their indices, in file order.
    pub fn links_of<'a>(&'a self, id: &'a str) -> impl Iterator<Item = (usize, &'a Link)> + 'a {
        self.links
            .iter()
            .enumerate()
            .filter(move |(_, l)| l.touches(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "name = \"t\"\nbootstrapper = \"s1\"\n";
    const BASE: &str = r#"name = "t"
bootstrapper = "s1"
[[node]]
id = "s1"
role = "server"
[[node]]
id = "r1"
role = "relay"
[[node]]
id = "p1"
role = "pop"
[[node]]
id = "g1"
role = "router"
[[node]]
id = "c1"
role = "client"
[[link]]
ends = ["s1", "r1"]
[[link]]
ends = ["r1", "p1"]
[[link]]
ends = ["p1", "g1"]
[[link]]
ends = ["g1", "c1"]
"#;

    /// Parses `text` and returns the error message, failing if it parsed.
    fn refused(text: &str) -> (Option<usize>, String) {
        match Topology::parse(text, "x.toml") {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => (e.line(), e.to_string()),
        }
    }

    /// BASE followed by `extra`; returns (line of the first line of `extra`, message).
    fn refused_extra(extra: &str) -> (usize, Option<usize>, String) {
        let first = BASE.lines().count() + 1;
        let (line, msg) = refused(&format!("{BASE}{extra}"));
        (first, line, msg)
    }

    #[test]
    fn base_is_valid() {
        let t = Topology::parse(BASE, "x.toml").expect("valid");
        assert_eq!(t.name, "t");
        assert_eq!(t.nodes.len(), 5);
        assert_eq!(t.links.len(), 4);
        assert_eq!(t.node("p1").map(|n| n.role), Some(Role::Pop));
        assert_eq!(t.node("p1").map(|n| n.line), Some(10));
        assert_eq!(t.links[1].line, 21);
        assert_eq!(t.index_of("g1"), Some(3));
        assert_eq!(t.index_of("zz"), None);
        assert_eq!(t.overlay_neighbours("r1"), vec!["p1", "s1"]);
        // The router is not an overlay neighbour.
        assert_eq!(t.overlay_neighbours("p1"), vec!["r1"]);
        assert!(t.overlay_neighbours("g1").is_empty());
        assert_eq!(t.servers().len(), 1);
        assert_eq!(t.pops()[0].id, "p1");
        assert_eq!(t.clients()[0].id, "c1");
        let (i, l) = t.link_between("p1", "r1").expect("linked");
        assert_eq!((i, l.ends.clone()), (1, ["r1".to_owned(), "p1".to_owned()]));
        assert!(t.link_between("s1", "p1").is_none());
        assert_eq!(t.links[0].delay_ms, 0.0);
        assert_eq!(t.links[0].rate_mbit, None);
    }

    #[test]
    fn link_parameters_are_read() {
        let text = format!(
            "{BASE}[[link]]\nends = [\"s1\", \"p1\"]\ndelay_ms = 2\njitter_ms = 0.5\nrate_mbit = 100.0\nloss_pct = 1.5\n"
        );
        let t = Topology::parse(&text, "x.toml").expect("valid");
        let (_, l) = t.link_between("p1", "s1").expect("linked");
        assert_eq!(
            (l.delay_ms, l.jitter_ms, l.rate_mbit, l.loss_pct),
            (2.0, 0.5, Some(100.0), 1.5)
        );
    }

    #[test]
    fn explicit_overlay_replaces_links() {
        let text = format!(
            "{BASE}[[overlay]]\nends = [\"s1\", \"p1\"]\n[[overlay]]\nends = [\"r1\", \"s1\"]\n"
        );
        let t = Topology::parse(&text, "x.toml").expect("valid");
        assert_eq!(t.overlay_neighbours("s1"), vec!["p1", "r1"]);
        assert_eq!(t.overlay_neighbours("p1"), vec!["s1"]);
        assert_eq!(t.overlay_neighbours("r1"), vec!["s1"]);
    }

    #[test]
    fn role_names() {
        for r in Role::ALL {
            assert_eq!(r.to_string().parse::<Role>(), Ok(r));
        }
        assert!(Role::Pop.is_overlay() && Role::Server.is_overlay() && Role::Relay.is_overlay());
        assert!(!Role::Router.is_overlay() && !Role::Client.is_overlay());
        assert!("Pop".parse::<Role>().is_err());
    }

    #[test]
    fn syntax_error_names_line() {
        let (line, msg) = refused(&format!("{HEAD}[[node]]\nid = \"s1\"\nrole = server\n"));
        assert_eq!(line, Some(5), "{msg}");
        assert!(msg.starts_with("x.toml:5: "), "{msg}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let (first, line, msg) = refused_extra("[[link]]\nends = [\"s1\", \"p1\"]\ndelay = 3.0\n");
        assert_eq!(line, Some(first + 2), "{msg}");
        assert!(msg.contains("delay"), "{msg}");
    }

    #[test]
    fn unknown_role() {
        let (first, line, msg) = refused_extra("[[node]]\nid = \"x1\"\nrole = \"cache\"\n");
        assert_eq!(line, Some(first + 2));
        assert_eq!(
            msg,
            format!(
                "x.toml:{}: unknown role \"cache\" (expected server, relay, pop, router or client)",
                first + 2
            )
        );
    }

    #[test]
    fn duplicate_node() {
        let (first, _, msg) = refused_extra("[[node]]\nid = \"r1\"\nrole = \"relay\"\n");
        assert_eq!(
            msg,
            format!(
                "x.toml:{}: duplicate node id \"r1\" (first defined on line 7)",
                first + 1
            )
        );
    }

    #[test]
    fn empty_and_bad_ids() {
        let (first, _, msg) = refused_extra("[[node]]\nid = \"\"\nrole = \"relay\"\n");
        assert_eq!(msg, format!("x.toml:{}: node id is empty", first + 1));
        let (first, _, msg) = refused_extra("[[node]]\nid = \"a b\"\nrole = \"relay\"\n");
        assert!(
            msg.starts_with(&format!("x.toml:{}: node id \"a b\" may only", first + 1)),
            "{msg}"
        );
    }

    #[test]
    fn bad_and_duplicate_address() {
        let (first, _, msg) =
            refused_extra("[[node]]\nid = \"x1\"\nrole = \"relay\"\naddress = \"10.0.0\"\n");
        assert!(
            msg.starts_with(&format!(
                "x.toml:{}: node \"x1\" has an invalid address \"10.0.0\"",
                first + 3
            )),
            "{msg}"
        );
        let (first, _, msg) = refused_extra(
            "[[node]]\nid = \"x1\"\nrole = \"client\"\naddress = \"10.9.9.9\"\n[[node]]\nid = \"x2\"\nrole = \"client\"\naddress = \"10.9.9.9\"\n",
        );
        assert_eq!(
            msg,
            format!(
                "x.toml:{}: node \"x2\" has the same address 10.9.9.9 as node \"x1\"",
                first + 7
            )
        );
    }

    #[test]
    fn several_addresses() {
        let text = format!(
            "{BASE}[[node]]\nid = \"x1\"\nrole = \"pop\"\naddresses = [\"192.0.2.1\", \"198.51.100.1\"]\n[[link]]\nends = [\"r1\", \"x1\"]\n"
        );
        let t = Topology::parse(&text, "x.toml").expect("valid");
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("literal");
        assert_eq!(
            t.node("x1").map(|n| n.addresses.clone()),
            Some(vec![ip("192.0.2.1"), ip("198.51.100.1")])
        );
        assert_eq!(t.node("p1").map(|n| n.addresses.len()), Some(0));
    }

    #[test]
    fn bad_addresses_name_their_line() {
        // Both keys.
        let (first, _, msg) = refused_extra(
            "[[node]]\nid = \"x1\"\nrole = \"relay\"\naddress = \"10.9.9.1\"\naddresses = [\"10.9.9.2\"]\n",
        );
        assert_eq!(
            msg,
            format!(
                "x.toml:{}: node \"x1\" has both address and addresses: give one of them",
                first + 4
            )
        );
        // An empty list.
        let (first, _, msg) =
            refused_extra("[[node]]\nid = \"x1\"\nrole = \"relay\"\naddresses = []\n");
        assert!(
            msg.starts_with(&format!(
                "x.toml:{}: node \"x1\" has an empty addresses list",
                first + 3
            )),
            "{msg}"
        );
        // A bad entry, on its own line.
        let (first, _, msg) = refused_extra(
            "[[node]]\nid = \"x1\"\nrole = \"relay\"\naddresses = [\n  \"10.9.9.1\",\n  \"10.9.9.300\",\n]\n",
        );
        assert!(
            msg.starts_with(&format!(
                "x.toml:{}: node \"x1\" has an invalid address \"10.9.9.300\"",
                first + 5
            )),
            "{msg}"
        );
        // Not unicast.
        let (_, _, msg) =
            refused_extra("[[node]]\nid = \"x1\"\nrole = \"relay\"\naddresses = [\"0.0.0.0\"]\n");
        assert!(msg.contains("invalid address \"0.0.0.0\""), "{msg}");
        // Twice in one node.
        let (first, _, msg) = refused_extra(
            "[[node]]\nid = \"x1\"\nrole = \"relay\"\naddresses = [\"10.9.9.1\", \"10.9.9.1\"]\n",
        );
        assert_eq!(
            msg,
            format!(
                "x.toml:{}: node \"x1\" lists address 10.9.9.1 twice",
                first + 3
            )
        );
        // Shared with another node's list.
        let (first, _, msg) = refused_extra(
            "[[node]]\nid = \"x1\"\nrole = \"relay\"\naddresses = [\"10.9.9.1\", \"10.9.9.2\"]\n[[node]]\nid = \"x2\"\nrole = \"pop\"\naddress = \"10.9.9.2\"\n",
        );
        assert_eq!(
            msg,
            format!(
                "x.toml:{}: node \"x2\" has the same address 10.9.9.2 as node \"x1\"",
                first + 7
            )
        );
    }

    #[test]
    fn link_to_unknown_node() {
        let (first, _, msg) = refused_extra("[[link]]\nends = [\"s1\", \"n99\"]\n");
        assert_eq!(
            msg,
            format!("x.toml:{}: link refers to unknown node \"n99\"", first + 1)
        );
    }

    #[test]
    fn link_to_itself() {
        let (first, _, msg) = refused_extra("[[link]]\nends = [\"r1\", \"r1\"]\n");
        assert_eq!(
            msg,
            format!("x.toml:{}: link joins node \"r1\" to itself", first + 1)
        );
    }

    #[test]
    fn duplicate_link_either_direction() {
        let (first, _, msg) = refused_extra("[[link]]\nends = [\"p1\", \"r1\"]\n");
        assert_eq!(
            msg,
            format!(
                "x.toml:{}: duplicate link between \"p1\" and \"r1\" (first defined on line 21)",
                first + 1
            )
        );
    }

    #[test]
    fn bad_link_parameters() {
        for (key, value, expected) in [
            ("delay_ms", "-1.0", "must not be negative"),
            ("jitter_ms", "nan", "must be a finite number"),
            ("rate_mbit", "-5.0", "must not be negative"),
            ("rate_mbit", "0.0", "must be positive"),
            ("loss_pct", "inf", "must be a finite number"),
            ("loss_pct", "100.5", "must be at most 100"),
        ] {
            let (first, line, msg) = refused_extra(&format!(
                "[[link]]\nends = [\"s1\", \"p1\"]\n{key} = {value}\n"
            ));
            assert_eq!(line, Some(first + 2), "{msg}");
            assert!(msg.contains(&format!("link parameter {key} = ")), "{msg}");
            assert!(msg.contains(expected), "{msg}");
        }
        // 100 % loss is allowed (a cut link).
        let text = format!("{BASE}[[link]]\nends = [\"s1\", \"p1\"]\nloss_pct = 100\n");
        assert!(Topology::parse(&text, "x.toml").is_ok());
    }

    #[test]
    fn no_server() {
        let (line, msg) = refused(&format!("{HEAD}[[node]]\nid = \"s1\"\nrole = \"relay\"\n"));
        assert_eq!(line, None);
        assert_eq!(
            msg,
            "x.toml: topology has no server (at least one node needs role = \"server\")"
        );
    }

    #[test]
    fn bootstrapper_not_a_node() {
        let (line, msg) = refused(&BASE.replace("bootstrapper = \"s1\"", "bootstrapper = \"bs\""));
        assert_eq!(line, Some(2));
        assert_eq!(
            msg,
            "x.toml:2: bootstrapper \"bs\" is not a node of the topology"
        );
    }

    #[test]
    fn missing_name_is_refused() {
        let (_, msg) = refused(&BASE.replace("name = \"t\"\n", ""));
        assert!(msg.contains("name"), "{msg}");
    }

    #[test]
    fn overlay_errors() {
        let (first, _, msg) = refused_extra("[[overlay]]\nends = [\"s1\", \"g1\"]\n");
        assert_eq!(
            msg,
            format!("x.toml:{}: overlay pair names router \"g1\": only servers, relays and pops are overlay nodes", first + 1)
        );
        let (first, _, msg) = refused_extra("[[overlay]]\nends = [\"c1\", \"s1\"]\n");
        assert!(
            msg.starts_with(&format!(
                "x.toml:{}: overlay pair names client \"c1\"",
                first + 1
            )),
            "{msg}"
        );
        let (first, _, msg) = refused_extra("[[overlay]]\nends = [\"s1\", \"zz\"]\n");
        assert_eq!(
            msg,
            format!(
                "x.toml:{}: overlay pair refers to unknown node \"zz\"",
                first + 1
            )
        );
        let (first, _, msg) = refused_extra("[[overlay]]\nends = [\"s1\", \"s1\"]\n");
        assert_eq!(
            msg,
            format!(
                "x.toml:{}: overlay pair joins node \"s1\" to itself",
                first + 1
            )
        );
        let (first, _, msg) = refused_extra(
            "[[overlay]]\nends = [\"s1\", \"p1\"]\n[[overlay]]\nends = [\"r1\", \"s1\"]\n[[overlay]]\nends = [\"p1\", \"s1\"]\n",
        );
        assert_eq!(
            msg,
            format!(
                "x.toml:{}: duplicate overlay pair \"p1\" - \"s1\" (first defined on line {})",
                first + 5,
                first + 1
            )
        );
    }

    #[test]
    fn overlay_pair_without_underlay_path() {
        let (first, _, msg) = refused_extra(
            "[[node]]\nid = \"p2\"\nrole = \"pop\"\n[[overlay]]\nends = [\"s1\", \"p1\"]\n[[overlay]]\nends = [\"s1\", \"p2\"]\n",
        );
        assert_eq!(
            msg,
            format!(
                "x.toml:{}: overlay pair \"s1\" - \"p2\" is not connected by any path of links",
                first + 6
            )
        );
    }

    #[test]
    fn pop_without_path_to_server() {
        // p2 hangs off a router only: no overlay link to anyone.
        let (first, _, msg) = refused_extra(
            "[[node]]\nid = \"p2\"\nrole = \"pop\"\n[[link]]\nends = [\"g1\", \"p2\"]\n",
        );
        assert_eq!(
            msg,
            format!(
                "x.toml:{}: pop \"p2\" has no overlay path to a server",
                first + 1
            )
        );
        // A relay on an island.
        let (first, _, msg) = refused_extra("[[node]]\nid = \"r9\"\nrole = \"relay\"\n");
        assert_eq!(
            msg,
            format!(
                "x.toml:{}: relay \"r9\" has no overlay path to a server",
                first + 1
            )
        );
        // With explicit pairs, links alone do not count.
        let (_, _, msg) = refused_extra("[[overlay]]\nends = [\"s1\", \"r1\"]\n");
        assert_eq!(msg, "x.toml:10: pop \"p1\" has no overlay path to a server");
    }

    #[test]
    fn several_servers_any_will_do() {
        let text = format!(
            "{HEAD}[[node]]\nid = \"s1\"\nrole = \"server\"\n[[node]]\nid = \"s2\"\nrole = \"server\"\n[[node]]\nid = \"p1\"\nrole = \"pop\"\n[[link]]\nends = [\"s2\", \"p1\"]\n"
        );
        let t = Topology::parse(&text, "x.toml").expect("p1 reaches s2");
        assert_eq!(t.servers().len(), 2);
    }

    #[test]
    fn load_names_the_file() {
        let err = Topology::load(Path::new("/nonexistent/t.toml")).expect_err("missing");
        assert!(
            err.to_string()
                .starts_with("/nonexistent/t.toml: cannot read topology file: "),
            "{err}"
        );
    }
}
