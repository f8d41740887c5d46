//! Static routes over the underlay, shortest by delay as OSPF with delay-based costs
//! would choose them: for every node, a next hop toward every link subnet it is not on.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::Ipv4Addr;

use ott_overlay::Topology;

/// One route: `subnet/24 via gateway`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) subnet: Ipv4Addr,
    pub(crate) via: Ipv4Addr,
}

/// Addresses of both ends of link `k` in the links plan.
pub(crate) fn link_ends(t: &Topology, k: usize) -> Option<[Ipv4Addr; 2]> {
    let l = t.links.get(k)?;
    let find = |id: &str| {
        t.link_addresses(id)
            .into_iter()
            .find(|&(i, _)| i == k)
            .map(|(_, ip)| ip)
    };
    Some([find(&l.ends[0])?, find(&l.ends[1])?])
}

fn subnet(ip: Ipv4Addr) -> Ipv4Addr {
    let o = ip.octets();
    Ipv4Addr::new(o[0], o[1], o[2], 0)
}

/// Routes of every node, skipping links for which `usable(k)` is false. Costs are the
/// links' delays in microseconds plus one per hop, so equal delays prefer fewer hops;
/// ties go to the lower link index, so the result is deterministic.
pub(crate) fn compute(t: &Topology, usable: impl Fn(usize) -> bool) -> HashMap<String, Vec<Route>> {
    let n = t.nodes.len();
    let index: HashMap<&str, usize> = t
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    // adjacency: (neighbour, link index, cost)
    let mut adj: Vec<Vec<(usize, usize, u64)>> = vec![Vec::new(); n];
    for (k, l) in t.links.iter().enumerate() {
        if !usable(k) {
            continue;
        }
        let (Some(&a), Some(&b)) = (index.get(l.ends[0].as_str()), index.get(l.ends[1].as_str()))
        else {
            continue;
        };
        let cost = (l.delay_ms.max(0.0) * 1000.0).round() as u64 + 1;
        adj[a].push((b, k, cost));
        adj[b].push((a, k, cost));
    }
    let ends: Vec<Option<[Ipv4Addr; 2]>> = (0..t.links.len()).map(|k| link_ends(t, k)).collect();
    let mut out = HashMap::new();
    for src in 0..n {
        // Dijkstra; first[v] = (link index of the first hop, neighbour) on the best path.
        let mut dist = vec![u64::MAX; n];
        let mut first: Vec<Option<(usize, usize)>> = vec![None; n];
        let mut heap = BinaryHeap::new();
        dist[src] = 0;
        heap.push(Reverse((0u64, src)));
        while let Some(Reverse((d, u))) = heap.pop() {
            if d > dist[u] {
                continue;
            }
            for &(v, k, c) in &adj[u] {
                let nd = d + c;
                let hop = if u == src { Some((k, v)) } else { first[u] };
                if nd < dist[v] || (nd == dist[v] && hop < first[v]) {
                    dist[v] = nd;
                    first[v] = hop;
                    heap.push(Reverse((nd, v)));
                }
            }
        }
        let me = &t.nodes[src].id;
        let mut routes = Vec::new();
        for (k, l) in t.links.iter().enumerate() {
            if l.touches(me) {
                continue;
            }
            let Some(addrs) = ends[k] else { continue };
            let (Some(&a), Some(&b)) =
                (index.get(l.ends[0].as_str()), index.get(l.ends[1].as_str()))
            else {
                continue;
            };
            let target = if dist[a] <= dist[b] { a } else { b };
            let Some((hop_link, hop_node)) = first[target] else {
                continue;
            };
            let Some(hop_addrs) = ends[hop_link] else {
                continue;
            };
            let hop_end = usize::from(t.links[hop_link].ends[0] != t.nodes[hop_node].id);
            routes.push(Route {
                subnet: subnet(addrs[0]),
                via: hop_addrs[hop_end],
            });
        }
        out.insert(me.clone(), routes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Topology {
        Topology::load(&crate::project_root().join("topologies/seed.toml")).expect("seed")
    }

    fn via(routes: &HashMap<String, Vec<Route>>, node: &str, subnet: [u8; 3]) -> Option<Ipv4Addr> {
        let s = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 0);
        routes
            .get(node)?
            .iter()
            .find(|r| r.subnet == s)
            .map(|r| r.via)
    }

    #[test]
    fn every_node_reaches_every_subnet_it_is_not_on() {
        let t = seed();
        let r = compute(&t, |_| true);
        for n in &t.nodes {
            let own = t.links_of(&n.id).count();
            assert_eq!(r[&n.id].len(), t.links.len() - own, "{}", n.id);
        }
    }

    #[test]
    fn shortest_by_delay_not_hops() {
        let t = seed();
        let r = compute(&t, |_| true);
        // s1 to n7's subnet with n8 (10.0.24): s1-n12-n14-n8 (6 ms) rather than through n13.
        assert_eq!(
            via(&r, "s1", [10, 0, 24]),
            Some(Ipv4Addr::new(10, 0, 17, 2))
        );
        // A client goes through its access router.
        assert_eq!(
            via(&r, "n16", [10, 0, 16]),
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        // Without the s1-n12 link, s1 goes through n13.
        let r = compute(&t, |k| k != 17);
        assert_eq!(
            via(&r, "s1", [10, 0, 24]),
            Some(Ipv4Addr::new(10, 0, 16, 2))
        );
    }
}
