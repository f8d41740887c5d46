//! The address plan: which IP address and ports each node is known by (SPEC §3).
//!
//! Addresses are derived from the topology, never written by hand (a node may override
//! its address with `address = "..."`, which wins in every plan):
//!
//! - [`AddressPlan::Loopback`]: the node at index `i` of [`Topology::nodes`] gets
//!   `127.1.(i / 250).(i % 250 + 1)`, so every program of a topology can run on one host.
//! - [`AddressPlan::Links`]: as in CORE, each link is its own /24 subnet: link index `k`
//!   (position in the file's `[[link]]` list) is `10.0.k.0/24`, `ends[0]` is `.1` and
//!   `ends[1]` is `.2`. Past 255 links the plan continues as `10.(k / 256).(k % 256).x`.
//!   A node is known by the address of its first link.
//!
//! Every overlay node listens for control messages on [`CONTROL_PORT`] and for media on
//! [`DATA_PORT`] of its address.
//!
//! These functions are inherent methods of [`Topology`], defined in this module.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::str::FromStr;

use crate::topology::Topology;

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
    /// Its control socket (`ip:CONTROL_PORT`).
    pub ctrl: SocketAddr,
    /// Its data socket (`ip:DATA_PORT`).
    pub data: SocketAddr,
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

impl Topology {
    /// The IP a node is known by: its override `address` if set; in the loopback plan
    /// the node at index `i` gets `127.1.(i / 250).(i % 250 + 1)`; in the links plan the
    /// address of its first link (`10.0.<link index>.1` for `ends[0]`, `.2` for
    /// `ends[1]`). `None` for an unknown id, or a node without links in the links plan.
    pub fn node_ip(&self, id: &str, plan: AddressPlan) -> Option<Ipv4Addr> {
        let index = self.index_of(id)?;
        if let Some(ip) = self.nodes.get(index).and_then(|n| n.address) {
            return Some(ip);
        }
        match plan {
            AddressPlan::Loopback => loopback_ip(index),
            AddressPlan::Links => self.link_addresses(id).first().map(|&(_, ip)| ip),
        }
    }

    /// The address `viewer` should use to reach `target`. In the links plan this is
    /// `target`'s address on the link they share if they are directly linked, else
    /// `target`'s [`node_ip`](Self::node_ip); in the loopback plan always its `node_ip`.
    /// `viewer` need not be a node of the topology (an anonymous client is not).
    pub fn ip_seen_from(&self, target: &str, viewer: &str, plan: AddressPlan) -> Option<Ipv4Addr> {
        let node = self.node(target)?;
        if node.address.is_some() || plan == AddressPlan::Loopback {
            return self.node_ip(target, plan);
        }
        match self.link_between(target, viewer) {
            Some((index, link)) => {
                let end = if link.ends[0] == target { 0 } else { 1 };
                link_ip(index, end)
            }
            None => self.node_ip(target, plan),
        }
    }

    /// [`ip_seen_from`](Self::ip_seen_from) with the overlay ports: `ctrl` is
    /// `ip:CONTROL_PORT`, `data` is `ip:DATA_PORT`.
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
        })
    }

    /// Every address of a node in the links plan, one per link it is an end of, as
    /// `(link index, ip)` in link order (for the emulator). The override `address` is
    /// not among them: it is an extra address the emulator adds itself.
    pub fn link_addresses(&self, id: &str) -> Vec<(usize, Ipv4Addr)> {
        self.links_of(id)
            .filter_map(|(index, link)| {
                let end = if link.ends[0] == id { 0 } else { 1 };
                link_ip(index, end).map(|ip| (index, ip))
            })
            .collect()
    }
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
