//! Property test: any sequence of link failures and recoveries keeps the tree loop free
//! at every step, and afterwards every node with a path to the server has a parent.

use std::time::Duration;

use ott_tree::sim::{RandomOverlay, Sim};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Take down the link with this index (modulo the number of links).
    Down(usize),
    /// Bring it back up.
    Up(usize),
    /// Let this many ms pass.
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<usize>().prop_map(Op::Down),
        any::<usize>().prop_map(Op::Up),
        (1u64..1500).prop_map(Op::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn link_failures_never_make_a_loop_and_connected_nodes_keep_a_parent(
        seed in 0u64..1000,
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let mut p = RandomOverlay::new(16, 3, seed);
        p.clients = 2;
        let mut sim = Sim::random(&p);
        sim.check_loops_each_step(true);
        sim.start();
        sim.run_for(Duration::from_secs(2));
        let links = sim.links();
        for op in &ops {
            match op {
                Op::Down(i) => {
                    let (a, b) = &links[i % links.len()];
                    sim.link_down(a, b);
                }
                Op::Up(i) => {
                    let (a, b) = &links[i % links.len()];
                    sim.link_up(a, b);
                }
                Op::Wait(ms) => sim.run_for(Duration::from_millis(*ms)),
            }
        }
        // Let the network settle: offers expire, new announcements flood.
        sim.run_for(Duration::from_secs(6));
        prop_assert_eq!(sim.stats().loop_violations, 0, "{:?}", sim.first_loop_violation());
        prop_assert!(sim.check_loop_free().is_ok());
        for n in sim.node_ids() {
            if n == "s0" {
                continue;
            }
            let has_parent = sim.node(&n).parent("s0").is_some();
            let connected = sim.connected(&n, "s0");
            prop_assert_eq!(
                has_parent, connected,
                "{} connected={} parent={:?}\n{}", n, connected, sim.node(&n).parent("s0"), sim.dump_tree()
            );
        }
    }
}

/// Found by the property test above: a node advertised a newer announcement, then fell
/// back to an older one offered through a neighbour that had taken the newer one (a
/// two-node loop), because what it advertised did not raise its feasibility distance.
#[test]
fn a_node_never_falls_back_to_an_older_announcement_than_it_advertised() {
    let mut p = RandomOverlay::new(16, 3, 283);
    p.clients = 2;
    let mut sim = Sim::random(&p);
    sim.check_loops_each_step(true);
    sim.start();
    sim.run_for(Duration::from_secs(2));
    let links = sim.links();
    for i in [
        4893760068228282319usize,
        192634150012765176,
        1422435854047024891,
    ] {
        let (a, b) = &links[i % links.len()];
        sim.link_down(a, b);
    }
    sim.run_for(Duration::from_secs(6));
    assert_eq!(
        sim.stats().loop_violations,
        0,
        "{:?}",
        sim.first_loop_violation()
    );
}
