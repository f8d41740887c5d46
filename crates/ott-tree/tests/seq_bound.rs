//! The bound on announcement seq jumps (`NodeConfig::seq_slack`) never refuses a
//! genuine announcement: not in steady state, not across a server restart.

use std::path::Path;
use std::time::Duration;

use ott_overlay::Topology;
use ott_proto::stream_id_for;
use ott_tree::sim::{Sim, SIM_STREAM};

fn topology(name: &str) -> Topology {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../topologies")
        .join(name);
    Topology::load(&p).expect("topology loads")
}

fn refused(sim: &Sim) -> u64 {
    sim.node_ids()
        .iter()
        .filter_map(|id| sim.try_node(id))
        .map(|n| n.stats().seq_too_far)
        .sum()
}

fn parent_changes(sim: &Sim) -> u64 {
    sim.node_ids()
        .iter()
        .filter_map(|id| sim.try_node(id))
        .map(|n| n.stats().parent_changes)
        .sum()
}

#[test]
fn genuine_announcements_pass_the_bound_in_steady_state_and_across_a_restart() {
    for name in ["multihomed-pops.toml", "seed.toml", "sparse.toml"] {
        let t = topology(name);
        let server = t.servers()[0].id.clone();
        let mut sim = Sim::from_topology(&t, 7);
        let pops = sim.pop_ids();
        let pops: Vec<&str> = pops.iter().map(String::as_str).collect();
        sim.add_client("v1", &pops);
        sim.select_stream("v1", SIM_STREAM);
        sim.start();
        sim.run_for(Duration::from_secs(5));
        let settled = parent_changes(&sim);
        sim.run_for(Duration::from_secs(30));
        assert_eq!(refused(&sim), 0, "{name}: steady state");
        assert_eq!(parent_changes(&sim), settled, "{name}: no flapping");
        // The server restarts 3 s later: its seq jumps by the time it was away, and its
        // routes come back.
        sim.kill(&server);
        sim.run_for(Duration::from_secs(3));
        sim.restart(&server);
        sim.run_for(Duration::from_secs(5));
        let id = stream_id_for(SIM_STREAM);
        let t0 = sim.elapsed();
        sim.run_for(Duration::from_secs(2));
        assert!(
            sim.first_arrival_after("v1", id, t0).is_some(),
            "{name}: the viewer watches again"
        );
        assert_eq!(refused(&sim), 0, "{name}: after the restart");
    }
}
