//! The address plan: which IP addresses and ports each node is known by (SPEC §3).
//!
//! Addresses are derived from the topology, never written by hand. A node may give its
//! own with `address = "..."` or `addresses = ["...", "..."]` (a host with several
//! interfaces); given addresses win in every plan.
//!
//! - [`AddressPlan::Loopback`]: the node at index `i` of [`Topology::nodes`] gets
//!   `127.1.(i / 250).(i % 250 + 1)`, so every program of a topology can run on one host.
//! - [`AddressPlan::Links`]: as in CORE, each link is its own /24 subnet: link index `k`
//!   (position in the file's `[[link]]` list) is `10.0.k.0/24`, `ends[0]` is `.1` and
//!   `ends[1]` is `.2`. Past 255 links the plan continues as `10.(k / 256).(k % 256).x`.
//!   A node has one address per link; it is known by the address of its first link.
//!
//! Every node has a *set* of addresses ([`Topology::addresses`]) and peers know all of
//! them, so a datagram from any of them is recognised. Which one a peer sends to is the
//! address *seen from* that peer ([`Topology::ip_seen_from`]): the one on the way from it.
//!
//! Every overlay node listens for control messages on [`CONTROL_PORT`] and for media on
//! [`DATA_PORT`] of its addresses.
//!
//! These functions are inherent methods of [`Topology`], defined in this module.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::str::FromStr;

use crate::topology::{Role, Topology};

/// Every overlay node's control socket port.
pub const CONTROL_PORT: u16 = 7000;
/// Every overlay node's data (media) socket port.
pub const DATA_PORT: u16 = 7001;

/// How addresses are derived from a topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AddressPlan {
    /// Each node gets its own `127.1.y.z` address: everything runs on one host.
    #[default]
    Loopback,
    /// Each link is its own `10.0.<link index>.0/24` subnet, as in CORE and namespace
    /// emulation.
    Links,
}

impl AddressPlan {
    /// The name used on command lines: `loopback` or `links`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Links => "links",
        }
    }
}

impl fmt::Display for AddressPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An address plan name other than `loopback` or `links`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown address plan \"{0}\" (expected loopback or links)")]
pub struct ParsePlanError(pub String);

impl FromStr for AddressPlan {
    type Err = ParsePlanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "loopback" => Ok(Self::Loopback),
            "links" => Ok(Self::Links),
            other => Err(ParsePlanError(other.to_owned())),
        }
    }
}

/// Where to reach one overlay node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The node's id.
    pub id: String,
    /// Its control socket to send to (`ip:CONTROL_PORT`, `ip` as seen from the asker).
    pub ctrl: SocketAddr,
    /// Its data socket (`ip:DATA_PORT`, the same `ip`).
    pub data: SocketAddr,
    /// Every address of the node ([`Topology::addresses`]); messages from any of them
    /// are the node's.
    pub addresses: Vec<Ipv4Addr>,
}

/// A peer's addresses as the bootstrapper gave them: where to send, and every control
/// address its messages may come from. The neighbour table and the client map any of
/// `all` (and `preferred`) to `id`, and nothing else: no address is ever learned from a
/// message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddrs {
    /// The peer's id.
    pub id: String,
    /// The control address to send to (the one on the way from this node).
    pub preferred: SocketAddr,
    /// Every control address of the peer; `preferred` counts even when not listed.
    pub all: Vec<SocketAddr>,
}

impl PeerAddrs {
    /// A peer known by `preferred` and the control addresses `all`.
    pub fn new(id: impl Into<String>, preferred: SocketAddr, all: Vec<SocketAddr>) -> Self {
        Self {
            id: id.into(),
            preferred,
            all,
        }
    }

    /// Whether a datagram from `addr` comes from this peer.
    pub fn owns(&self, addr: SocketAddr) -> bool {
        self.preferred == addr || self.all.contains(&addr)
    }
}

impl From<(String, SocketAddr)> for PeerAddrs {
    /// A peer with a single address.
    fn from((id, addr): (String, SocketAddr)) -> Self {
        Self::new(id, addr, vec![addr])
    }
}

/// Address of end `end` (0 or 1) of the link at `index` in the links plan, or `None`
/// past the 65,536 links the plan can number.
fn link_ip(index: usize, end: usize) -> Option<Ipv4Addr> {
    let hi = u8::try_from(index / 256).ok()?;
    // `index % 256` always fits a u8.
    let lo = (index % 256) as u8;
    let host = if end == 0 { 1 } else { 2 };
    Some(Ipv4Addr::new(10, hi, lo, host))
}

/// Loopback address of the node at `index`, or `None` past the 64,000 nodes the plan
/// can number.
fn loopback_ip(index: usize) -> Option<Ipv4Addr> {
    let third = u8::try_from(index / 250).ok()?;
    // `index % 250 + 1` is at most 250 and fits a u8.
    let fourth = (index % 250 + 1) as u8;
    Some(Ipv4Addr::new(127, 1, third, fourth))
}

/// Number of leading bits `a` and `b` share.
fn common_prefix(a: Ipv4Addr, b: Ipv4Addr) -> u32 {
    (u32::from(a) ^ u32::from(b)).leading_zeros()
}

impl Topology {
    /// Every address of a node, the one it is known by first: its given addresses
    /// (`address`/`addresses`) if any; then in the loopback plan, without given ones,
    /// `127.1.(i / 250).(i % 250 + 1)` for the node at index `i`; in the links plan, one
    /// address per link it is an end of, in link order (after the given ones). Empty for
    /// an unknown id, or a node without links nor given address in the links plan.
    pub fn addresses(&self, id: &str, plan: AddressPlan) -> Vec<Ipv4Addr> {
        let Some(index) = self.index_of(id) else {
            return Vec::new();
        };
        let mut out = self
            .nodes
            .get(index)
            .map(|n| n.addresses.clone())
            .unwrap_or_default();
        match plan {
            AddressPlan::Loopback => {
                if out.is_empty() {
                    out.extend(loopback_ip(index));
                }
            }
            AddressPlan::Links => {
                for (_, ip) in self.link_addresses(id) {
                    if !out.contains(&ip) {
                        out.push(ip);
                    }
                }
            }
        }
        out
    }

    /// The IP a node is known by: the first of [`addresses`](Self::addresses): its
    /// first given address if any; in the loopback plan the node at index `i` gets
    /// `127.1.(i / 250).(i % 250 + 1)`; in the links plan the address of its first link
    /// (`10.0.<link index>.1` for `ends[0]`, `.2` for `ends[1]`). `None` for an unknown
    /// id, or a node without links in the links plan.
    pub fn node_ip(&self, id: &str, plan: AddressPlan) -> Option<Ipv4Addr> {
        self.addresses(id, plan).first().copied()
    }

    /// The address `viewer` should send to to reach `target`: the one on its way.
    ///
    /// - A target with given addresses: the one sharing the longest prefix (at least 8
    ///   bits) with one of `viewer`'s addresses (same subnet first), ties to the
    ///   earlier one; else the first (also for a viewer outside the topology).
    /// - Loopback plan: the target's only address.
    /// - Links plan, `viewer` directly linked to `target`: `target`'s address on the
    ///   link they share.
    /// - Links plan, `viewer` a node of the topology: `target`'s address on the last
    ///   link of the shortest underlay path from `viewer` (by delay, plus one per hop,
    ///   as the emulator's routes), so datagrams arrive by the interface facing the
    ///   viewer and never take a detour through the target's other links.
    /// - Links plan, `viewer` not a node of the topology (an anonymous client): the
    ///   target's address on its first link to a router or a client (its access side,
    ///   where viewers come from), else its [`node_ip`](Self::node_ip).
    ///
    /// `None` for an unknown target, or a target without any address.
    pub fn ip_seen_from(&self, target: &str, viewer: &str, plan: AddressPlan) -> Option<Ipv4Addr> {
        let node = self.node(target)?;
        if !node.addresses.is_empty() {
            let mine = self.addresses(viewer, plan);
            let best = node.addresses.iter().enumerate().max_by_key(|&(i, &ip)| {
                // Sharing less than a /8 says nothing about where the viewer is.
                let shared = mine
                    .iter()
                    .map(|&m| common_prefix(ip, m))
                    .filter(|&bits| bits >= 8)
                    .max();
                (shared, Reverse(i))
            });
            return best.map(|(_, &ip)| ip);
        }
        if plan == AddressPlan::Loopback {
            return self.node_ip(target, plan);
        }
        if let Some((index, link)) = self.link_between(target, viewer) {
            let end = if link.ends[0] == target { 0 } else { 1 };
            return link_ip(index, end);
        }
        let last = if self.node(viewer).is_some() {
            self.last_link_from(viewer, target)
        } else {
            self.links_of(target)
                .find(|(_, l)| {
                    l.other_end(target)
                        .and_then(|o| self.node(o))
                        .is_some_and(|o| matches!(o.role, Role::Router | Role::Client))
                })
                .map(|(k, _)| k)
        };
        let on_link = last.and_then(|k| {
            let link = self.links.get(k)?;
            let end = if link.ends[0] == target { 0 } else { 1 };
            link_ip(k, end)
        });
        on_link.or_else(|| self.node_ip(target, plan))
    }

    /// Index of the last link on the shortest underlay path from `from` to `to` (cost:
    /// delay in µs plus one per hop; ties to the lower link index), or `None` when they
    /// are not connected or the same node.
    fn last_link_from(&self, from: &str, to: &str) -> Option<usize> {
        let index: HashMap<&str, usize> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.as_str(), i))
            .collect();
        let (&src, &dst) = (index.get(from)?, index.get(to)?);
        let mut adj: Vec<Vec<(usize, usize, u64)>> = vec![Vec::new(); self.nodes.len()];
        for (k, l) in self.links.iter().enumerate() {
            let (Some(&a), Some(&b)) =
                (index.get(l.ends[0].as_str()), index.get(l.ends[1].as_str()))
            else {
                continue;
            };
            // Delays are validated finite and not negative.
            let cost = ((l.delay_ms * 1000.0).round() as u64).saturating_add(1);
            adj[a].push((b, k, cost));
            adj[b].push((a, k, cost));
        }
        let mut dist = vec![u64::MAX; self.nodes.len()];
        let mut last: Vec<Option<usize>> = vec![None; self.nodes.len()];
        let mut heap = BinaryHeap::new();
        dist[src] = 0;
        heap.push(Reverse((0u64, src)));
        while let Some(Reverse((d, u))) = heap.pop() {
            if d > dist[u] {
                continue;
            }
            for &(v, k, c) in &adj[u] {
                let nd = d.saturating_add(c);
                if nd < dist[v] || (nd == dist[v] && last[v].is_some_and(|l| k < l)) {
                    dist[v] = nd;
                    last[v] = Some(k);
                    heap.push(Reverse((nd, v)));
                }
            }
        }
        last[dst]
    }

    /// [`ip_seen_from`](Self::ip_seen_from) with the overlay ports: `ctrl` is
    /// `ip:CONTROL_PORT`, `data` is `ip:DATA_PORT`; `addresses` is every address of the
    /// target.
    pub fn endpoint_seen_from(
        &self,
        target: &str,
        viewer: &str,
        plan: AddressPlan,
    ) -> Option<Endpoint> {
        let ip = self.ip_seen_from(target, viewer, plan)?;
        Some(Endpoint {
            id: target.to_owned(),
            ctrl: SocketAddr::V4(SocketAddrV4::new(ip, CONTROL_PORT)),
            data: SocketAddr::V4(SocketAddrV4::new(ip, DATA_PORT)),
            addresses: self.addresses(target, plan),
        })
    }

    /// Every link address of a node in the links plan, one per link it is an end of, as
    /// `(link index, ip)` in link order (for the emulator). Given addresses are not
    /// among them.
    pub fn link_addresses(&self, id: &str) -> Vec<(usize, Ipv4Addr)> {
        self.links_of(id)
            .filter_map(|(index, link)| {
                let end = if link.ends[0] == id { 0 } else { 1 };
                link_ip(index, end).map(|ip| (index, ip))
            })
            .collect()
    }
}

/// The control addresses of a peer from its IP addresses (`port` on each), as a
/// [`PeerAddrs`] whose preferred address is `preferred`.
pub fn peer_addrs(id: &str, preferred: SocketAddr, ips: &[IpAddr]) -> PeerAddrs {
    let all = ips
        .iter()
        .map(|&ip| SocketAddr::new(ip, preferred.port()))
        .collect();
    PeerAddrs::new(id, preferred, all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> Topology {
        Topology::parse(
            r#"
name = "chain"
bootstrapper = "a"
[[node]]
id = "a"
role = "server"
[[node]]
id = "b"
role = "relay"
[[node]]
id = "c"
role = "pop"
[[link]]
ends = ["a", "b"]
[[link]]
ends = ["c", "b"]
"#,
            "chain.toml",
        )
        .expect("valid test topology")
    }

    #[test]
    fn loopback_is_distinct_for_600_nodes() {
        let mut text = String::from("name = \"big\"\nbootstrapper = \"n0\"\n");
        for i in 0..600 {
            let role = if i == 0 { "server" } else { "client" };
            text.push_str(&format!("[[node]]\nid = \"n{i}\"\nrole = \"{role}\"\n"));
        }
        let t = Topology::parse(&text, "big.toml").expect("valid");
        let ips: std::collections::HashSet<Ipv4Addr> = t
            .nodes
            .iter()
            .map(|n| t.node_ip(&n.id, AddressPlan::Loopback).expect("has ip"))
            .collect();
        assert_eq!(ips.len(), 600);
        assert!(ips.iter().all(|ip| ip.is_loopback()));
        assert_eq!(
            t.node_ip("n0", AddressPlan::Loopback),
            Some(Ipv4Addr::new(127, 1, 0, 1))
        );
        assert_eq!(
            t.node_ip("n249", AddressPlan::Loopback),
            Some(Ipv4Addr::new(127, 1, 0, 250))
        );
        assert_eq!(
            t.node_ip("n250", AddressPlan::Loopback),
            Some(Ipv4Addr::new(127, 1, 1, 1))
        );
        assert_eq!(
            t.node_ip("n599", AddressPlan::Loopback),
            Some(Ipv4Addr::new(127, 1, 2, 100))
        );
        // No links: nothing in the links plan.
        assert_eq!(t.node_ip("n3", AddressPlan::Links), None);
    }

    #[test]
    fn links_plan_on_a_chain() {
        let t = chain();
        let ip = |a, b, c, d| Ipv4Addr::new(a, b, c, d);
        assert_eq!(t.node_ip("a", AddressPlan::Links), Some(ip(10, 0, 0, 1)));
        assert_eq!(t.node_ip("b", AddressPlan::Links), Some(ip(10, 0, 0, 2)));
        assert_eq!(t.node_ip("c", AddressPlan::Links), Some(ip(10, 0, 1, 1)));
        assert_eq!(
            t.link_addresses("b"),
            vec![(0, ip(10, 0, 0, 2)), (1, ip(10, 0, 1, 2))]
        );
        // c sees b on their shared link, a sees b on theirs.
        assert_eq!(
            t.ip_seen_from("b", "c", AddressPlan::Links),
            Some(ip(10, 0, 1, 2))
        );
        assert_eq!(
            t.ip_seen_from("b", "a", AddressPlan::Links),
            Some(ip(10, 0, 0, 2))
        );
        // a and c are not linked: c's own address.
        assert_eq!(
            t.ip_seen_from("c", "a", AddressPlan::Links),
            Some(ip(10, 0, 1, 1))
        );
        // An anonymous viewer gets node_ip.
        assert_eq!(
            t.ip_seen_from("b", "nobody", AddressPlan::Links),
            Some(ip(10, 0, 0, 2))
        );
        let e = t
            .endpoint_seen_from("b", "c", AddressPlan::Links)
            .expect("known");
        assert_eq!(e.id, "b");
        assert_eq!(e.ctrl, "10.0.1.2:7000".parse().expect("literal"));
        assert_eq!(e.data, "10.0.1.2:7001".parse().expect("literal"));
        assert_eq!(t.endpoint_seen_from("zz", "a", AddressPlan::Links), None);
        // Loopback ignores the viewer.
        assert_eq!(
            t.ip_seen_from("b", "c", AddressPlan::Loopback),
            Some(ip(127, 1, 0, 2))
        );
    }

    #[test]
    fn override_wins() {
        let t = Topology::parse(
            r#"
name = "o"
bootstrapper = "a"
[[node]]
id = "a"
role = "server"
address = "192.0.2.7"
[[node]]
id = "b"
role = "pop"
[[link]]
ends = ["a", "b"]
"#,
            "o.toml",
        )
        .expect("valid");
        let o = Ipv4Addr::new(192, 0, 2, 7);
        assert_eq!(t.node_ip("a", AddressPlan::Loopback), Some(o));
        assert_eq!(t.node_ip("a", AddressPlan::Links), Some(o));
        assert_eq!(t.ip_seen_from("a", "b", AddressPlan::Links), Some(o));
        assert_eq!(
            t.node_ip("b", AddressPlan::Links),
            Some(Ipv4Addr::new(10, 0, 0, 2))
        );
    }

    /// A PoP whose first link faces the core and whose second faces the access
    /// router of two clients; a relay two hops from the server on a sparse overlay.
    fn multihomed() -> Topology {
        Topology::parse(
            r#"
name = "mh"
bootstrapper = "s"
[[node]]
id = "s"
role = "server"
[[node]]
id = "r"
role = "relay"
[[node]]
id = "p"
role = "pop"
[[node]]
id = "g"
role = "router"
[[node]]
id = "c"
role = "client"
[[node]]
id = "d"
role = "client"
[[link]]
ends = ["p", "r"]
[[link]]
ends = ["s", "r"]
[[link]]
ends = ["p", "g"]
[[link]]
ends = ["g", "c"]
[[link]]
ends = ["d", "g"]
[[link]]
ends = ["c", "r"]
delay_ms = 50.0
[[overlay]]
ends = ["s", "p"]
[[overlay]]
ends = ["s", "r"]
"#,
            "mh.toml",
        )
        .expect("valid test topology")
    }

    #[test]
    fn every_address_of_a_node() {
        let t = multihomed();
        let ip = |c, d| Ipv4Addr::new(10, 0, c, d);
        // p: first link (index 0) then its access link (index 2).
        assert_eq!(
            t.addresses("p", AddressPlan::Links),
            vec![ip(0, 1), ip(2, 1)]
        );
        assert_eq!(t.node_ip("p", AddressPlan::Links), Some(ip(0, 1)));
        assert_eq!(
            t.addresses("p", AddressPlan::Loopback),
            vec![Ipv4Addr::new(127, 1, 0, 3)]
        );
        assert!(t.addresses("zz", AddressPlan::Links).is_empty());
        let e = t
            .endpoint_seen_from("p", "c", AddressPlan::Links)
            .expect("known");
        assert_eq!(e.addresses, vec![ip(0, 1), ip(2, 1)]);
    }

    #[test]
    fn seen_from_the_path() {
        let t = multihomed();
        let ip = |c, d| Ipv4Addr::new(10, 0, c, d);
        // The clients reach p through g: p's access address, not the one it is known by.
        assert_eq!(t.ip_seen_from("p", "c", AddressPlan::Links), Some(ip(2, 1)));
        assert_eq!(t.ip_seen_from("p", "d", AddressPlan::Links), Some(ip(2, 1)));
        // The router is directly linked: the shared link.
        assert_eq!(t.ip_seen_from("p", "g", AddressPlan::Links), Some(ip(2, 1)));
        // s and p are overlay neighbours two hops apart: p's address facing r.
        assert_eq!(t.ip_seen_from("p", "s", AddressPlan::Links), Some(ip(0, 1)));
        // From p, s is reached over link 1 (r - s): s's only address.
        assert_eq!(t.ip_seen_from("s", "p", AddressPlan::Links), Some(ip(1, 1)));
        // c reaches r through g and p (3 ms) rather than over its 50 ms link: r's
        // address on link 0. d has no direct link and goes the same way.
        assert_eq!(t.ip_seen_from("r", "d", AddressPlan::Links), Some(ip(0, 2)));
        // Directly linked wins over the shortest path (the link is the overlay edge).
        assert_eq!(t.ip_seen_from("r", "c", AddressPlan::Links), Some(ip(5, 2)));
        // An anonymous client gets p's access side.
        assert_eq!(
            t.ip_seen_from("p", "nobody", AddressPlan::Links),
            Some(ip(2, 1))
        );
        // A node without an access link: its first address.
        assert_eq!(
            t.ip_seen_from("s", "nobody", AddressPlan::Links),
            Some(ip(1, 1))
        );
    }

    #[test]
    fn given_addresses_by_longest_prefix() {
        let t = Topology::parse(
            r#"
name = "hosts"
bootstrapper = "s"
[[node]]
id = "s"
role = "server"
address = "192.168.1.10"
[[node]]
id = "p"
role = "pop"
addresses = ["192.168.1.20", "10.20.0.20"]
[[node]]
id = "c"
role = "client"
address = "10.20.0.99"
[[node]]
id = "v"
role = "client"
[[link]]
ends = ["s", "p"]
[[link]]
ends = ["p", "c"]
"#,
            "hosts.toml",
        )
        .expect("valid");
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("literal");
        for plan in [AddressPlan::Loopback, AddressPlan::Links] {
            assert_eq!(t.ip_seen_from("p", "s", plan), Some(ip("192.168.1.20")));
            assert_eq!(t.ip_seen_from("p", "c", plan), Some(ip("10.20.0.20")));
            // Outside the topology: the first.
            assert_eq!(
                t.ip_seen_from("p", "nobody", plan),
                Some(ip("192.168.1.20"))
            );
            assert_eq!(t.node_ip("p", plan), Some(ip("192.168.1.20")));
        }
        assert_eq!(
            t.addresses("p", AddressPlan::Loopback),
            vec![ip("192.168.1.20"), ip("10.20.0.20")]
        );
        // In the links plan its link addresses come after the given ones.
        assert_eq!(
            t.addresses("p", AddressPlan::Links),
            vec![
                ip("192.168.1.20"),
                ip("10.20.0.20"),
                ip("10.0.0.2"),
                ip("10.0.1.1")
            ]
        );
        // v (loopback 127.1.0.4) shares no /8 with either: the first.
        assert_eq!(
            t.ip_seen_from("p", "v", AddressPlan::Loopback),
            Some(ip("192.168.1.20"))
        );
    }

    #[test]
    fn peer_addrs_own_their_addresses() {
        let a: SocketAddr = "10.0.0.1:7000".parse().expect("literal");
        let b: SocketAddr = "10.0.2.1:7000".parse().expect("literal");
        let p = peer_addrs("p", b, &[a.ip(), b.ip()]);
        assert_eq!(p.preferred, b);
        assert!(p.owns(a) && p.owns(b));
        assert!(!p.owns("10.0.2.1:7001".parse().expect("literal")));
        let single = PeerAddrs::from(("q".to_owned(), a));
        assert!(single.owns(a) && !single.owns(b));
    }

    #[test]
    fn link_ip_past_255_links() {
        assert_eq!(link_ip(255, 1), Some(Ipv4Addr::new(10, 0, 255, 2)));
        assert_eq!(link_ip(256, 0), Some(Ipv4Addr::new(10, 1, 0, 1)));
        assert_eq!(link_ip(65_536, 0), None);
        assert_eq!(loopback_ip(64_000), None);
    }

    #[test]
    fn plan_names_round_trip() {
        for plan in [AddressPlan::Loopback, AddressPlan::Links] {
            assert_eq!(plan.to_string().parse::<AddressPlan>(), Ok(plan));
        }
        let err = "lan".parse::<AddressPlan>().expect_err("not a plan");
        assert_eq!(
            err.to_string(),
            "unknown address plan \"lan\" (expected loopback or links)"
        );
    }
}
