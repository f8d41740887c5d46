//! Scenario files of the emulator: the parser of `xtask/src/emulate/scenario.rs`
//! (compiled here as a module: xtask is a binary) on any text, checked against the seed
//! topology, returns `Ok` or an error, never panics; an accepted scenario holds only
//! finite, non-negative times.
#![deny(unsafe_code)]
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ott_overlay::Topology;

#[allow(dead_code, unreachable_pub)]
#[path = "../../xtask/src/emulate/scenario.rs"]
mod scenario;

fn topology() -> &'static Topology {
    static T: OnceLock<Topology> = OnceLock::new();
    T.get_or_init(|| {
        Topology::parse(
            include_str!("../../topologies/seed.toml"),
            "topologies/seed.toml",
        )
        .expect("the seed topology parses")
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match scenario::Scenario::parse(&text, topology()) {
        Ok(s) => {
            assert!(s.duration_s.is_finite() && s.duration_s > 0.0);
            for c in &s.clients {
                assert!(c.start_s.is_finite() && c.start_s >= 0.0);
            }
            for e in &s.events {
                assert!(e.at_s.is_finite() && e.at_s >= 0.0);
                let _ = e.action.link_change();
            }
        }
        Err(e) => {
            let _ = format!("{e:#}");
        }
    }
});
