//! Topology files: `Topology::parse` on any text returns `Ok` or a located error, never
//! panics; on an accepted topology every query the programs make, and the
//! bootstrapper's answer to every node, works without panicking.
#![deny(unsafe_code)]
#![no_main]
use libfuzzer_sys::fuzz_target;
use ott_bootstrap::{Request, Service};
use ott_overlay::{AddressPlan, Topology};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let t = match Topology::parse(&text, "fuzz.toml") {
        Ok(t) => t,
        Err(e) => {
            let _ = (e.line(), e.to_string());
            return;
        }
    };
    let ids: Vec<String> = t.nodes.iter().map(|n| n.id.clone()).collect();
    for id in &ids {
        assert!(t.node(id).is_some());
        let _ = t.index_of(id);
        let _ = t.overlay_neighbours(id);
        let _ = t.links_of(id).count();
        let _ = t.link_addresses(id);
        for plan in [AddressPlan::Loopback, AddressPlan::Links] {
            let _ = t.node_ip(id, plan);
            for other in ids.iter().take(8) {
                let _ = t.ip_seen_from(other, id, plan);
                let _ = t.link_between(id, other);
            }
        }
    }
    let _ = (t.servers(), t.pops(), t.clients());
    for plan in [AddressPlan::Loopback, AddressPlan::Links] {
        let s = Service::new(t.clone(), plan);
        for id in ids.iter().take(16) {
            let _ = s.answer(&Request::Node { id: id.clone() });
            let _ = s.answer(&Request::Client {
                id: Some(id.clone()),
            });
        }
        let _ = s.answer(&Request::Client { id: None });
    }
});
