//! Every file under `topologies/` loads, and its addresses are consistent.
// Tests may read the clock (an origin for fake time) and files (samples).
#![allow(clippy::disallowed_methods)]

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ott_overlay::{AddressPlan, Topology};

fn topology_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../topologies");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_topology_file_loads() {
    let files = topology_files();
    assert!(
        files.len() >= 4,
        "expected the shipped topologies, found {files:?}"
    );
    for path in files {
        let t = Topology::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!t.name.is_empty());
        assert!(!t.pops().is_empty(), "{}: no pop", path.display());
        for plan in [AddressPlan::Loopback, AddressPlan::Links] {
            // Every overlay node has an address, and no two nodes share one.
            let mut seen = HashSet::new();
            for n in t.nodes.iter().filter(|n| n.role.is_overlay()) {
                let ip = t.node_ip(&n.id, plan).unwrap_or_else(|| {
                    panic!("{}: {} has no {plan} address", path.display(), n.id)
                });
                assert!(seen.insert(ip), "{}: {ip} given twice", path.display());
            }
        }
        // Every link address is unique.
        let mut seen = HashSet::new();
        for n in &t.nodes {
            for (_, ip) in t.link_addresses(&n.id) {
                assert!(seen.insert(ip), "{}: {ip} given twice", path.display());
            }
        }
    }
}

/// Parses the `[[link]] # 10.0.K: a - b (...)` annotations of a file.
fn link_annotations(text: &str) -> Vec<(usize, String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("[[link]] # 10.0."))
        .map(|rest| {
            let (k, ends) = rest.split_once(':').expect("`K:` after the subnet");
            let ends = ends.split('(').next().unwrap_or(ends);
            let (a, b) = ends.split_once(" - ").expect("`a - b`");
            let k = k.trim().parse().expect("subnet number");
            (k, a.trim().to_owned(), b.trim().to_owned())
        })
        .collect()
}

/// A file may annotate its links with `[[link]] # 10.0.K: a - b`; check that link K is
/// written there and joins `a` (.1) to `b` (.2), so the links plan gives the addresses
/// the comment promises. When a file annotates any link, it must annotate every one,
/// each subnet exactly once.
#[test]
fn link_subnet_comments_match_the_links_plan() {
    let mut checked = 0;
    for path in topology_files() {
        let text = std::fs::read_to_string(&path).expect("readable");
        let t = Topology::parse(&text, &path.display().to_string()).expect("valid");
        let annotated = link_annotations(&text);
        if annotated.is_empty() {
            continue;
        }
        checked += annotated.len();
        let name = path.display();
        assert_eq!(
            annotated.len(),
            t.links.len(),
            "{name}: some links unannotated"
        );
        let subnets: HashSet<usize> = annotated.iter().map(|(k, _, _)| *k).collect();
        assert_eq!(
            subnets.len(),
            annotated.len(),
            "{name}: a subnet appears twice"
        );
        for (k, a, b) in annotated {
            let link = t
                .links
                .get(k)
                .unwrap_or_else(|| panic!("{name}: no link {k}"));
            assert_eq!(link.ends, [a.clone(), b.clone()], "{name}: link {k}");
            let third = u8::try_from(k).expect("fewer than 256 links");
            assert_eq!(
                t.ip_seen_from(&a, &b, AddressPlan::Links),
                Some(Ipv4Addr::new(10, 0, third, 1))
            );
            assert_eq!(
                t.ip_seen_from(&b, &a, AddressPlan::Links),
                Some(Ipv4Addr::new(10, 0, third, 2))
            );
        }
    }
    assert!(checked > 0, "no annotated topology file found");
}
