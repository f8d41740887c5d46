//! The node counters behind `ott_failovers_total` and `ott_routes_lost_total`: a parent
//! declared dead with another way out is one failover; with none, one route lost.

use std::time::Duration;

use ott_tree::sim::{LinkParams, Sim};
use ott_tree::Role;

fn link(ms: u64) -> LinkParams {
    LinkParams::new(Duration::from_millis(ms))
}

#[test]
fn dead_parent_with_another_way_out_is_a_failover() {
    // s1 -1ms- r -1ms- x ; s1 -5ms- p -5ms- x: x takes r, then p once r dies (p's own
    // route does not go through x, so x has another way out at once).
    let mut sim = Sim::new(7);
    sim.add_node("s1", Role::Server);
    for id in ["p", "r"] {
        sim.add_node(id, Role::Relay);
    }
    sim.add_node("x", Role::Pop);
    sim.add_link("s1", "r", link(1));
    sim.add_link("r", "x", link(1));
    sim.add_link("s1", "p", link(5));
    sim.add_link("p", "x", link(5));
    sim.start();
    sim.run_for(Duration::from_secs(4));
    assert_eq!(sim.node("x").parent("s1"), Some("r"));
    let before = sim.node("x").stats().clone();
    assert_eq!((before.failovers, before.routes_lost), (0, 0), "{before:?}");
    sim.kill("r");
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.node("x").parent("s1"), Some("p"));
    let after = sim.node("x").stats();
    assert_eq!(after.failovers, 1, "{after:?}");
    assert_eq!(after.routes_lost, 0, "{after:?}");
    assert!(after.parent_changes > before.parent_changes);
}

#[test]
fn dead_parent_without_another_way_out_is_a_route_lost() {
    // s1 - a - c: c has only a.
    let mut sim = Sim::new(8);
    sim.add_node("s1", Role::Server);
    sim.add_node("a", Role::Relay);
    sim.add_node("c", Role::Pop);
    sim.add_link("s1", "a", link(2));
    sim.add_link("a", "c", link(2));
    sim.start();
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.node("c").parent("s1"), Some("a"));
    sim.kill("a");
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.node("c").parent("s1"), None);
    let st = sim.node("c").stats();
    assert_eq!(st.routes_lost, 1, "{st:?}");
    assert_eq!(st.failovers, 0, "{st:?}");
}
