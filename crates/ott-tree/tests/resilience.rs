//! Failover, scale and loop-freedom scenarios on the simulator (issue 3).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use ott_overlay::Topology;
use ott_proto::stream_id_for;
use ott_tree::sim::{RandomOverlay, Sim, SIM_STREAM};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn topology(name: &str) -> Topology {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../topologies")
        .join(name);
    Topology::load(&p).expect("topology loads")
}

/// The seed topology with two clients, each given every PoP, watching the stream.
fn seed_with_clients(seed: u64) -> Sim {
    let t = topology("seed.toml");
    let mut sim = Sim::from_topology(&t, seed);
    let pops = sim.pop_ids();
    let pops: Vec<&str> = pops.iter().map(String::as_str).collect();
    for c in ["v1", "v2"] {
        sim.add_client(c, &pops);
        sim.select_stream(c, SIM_STREAM);
    }
    sim
}

/// Relays on the path from the server to any client's PoP.
fn active_relays(sim: &Sim) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for c in sim.client_ids() {
        let Some(pop) = sim.client(&c).pop() else {
            continue;
        };
        for n in sim.node(pop).status().path {
            if sim.role(&n) == Some(ott_tree::Role::Relay) {
                out.insert(n);
            }
        }
    }
    out
}

#[test]
fn seed_topology_kill_each_active_relay_clients_resume_within_a_second() {
    let id = stream_id_for(SIM_STREAM);
    let relays = {
        let mut sim = seed_with_clients(1);
        sim.start();
        sim.run_for(secs(5));
        active_relays(&sim)
    };
    assert!(!relays.is_empty());
    for relay in relays {
        let mut sim = seed_with_clients(1);
        sim.check_loops_each_step(true);
        sim.start();
        sim.run_for(secs(5));
        for c in ["v1", "v2"] {
            assert!(sim.received(c, id) > 20, "{c} watches before the failure");
        }
        let t = sim.elapsed();
        sim.kill(&relay);
        sim.run_for(secs(3));
        for c in ["v1", "v2"] {
            // Every PoP of the seed topology keeps a path when one relay dies, except a
            // PoP whose only uplink is that relay: then the client moves to another PoP.
            let gap = sim.longest_gap(c, id, t - ms(100), sim.elapsed());
            eprintln!("killed {relay}: {c} longest gap {gap:?}");
            assert!(
                gap <= secs(1),
                "{c} went {gap:?} without media after {relay} died\n{}",
                sim.dump_tree()
            );
        }
        assert_eq!(
            sim.stats().loop_violations,
            0,
            "{:?}",
            sim.first_loop_violation()
        );
    }
}

/// Convergence time: the first multiple of 100 ms at which every node has a parent.
fn converge(sim: &mut Sim, within: Duration) -> Option<Duration> {
    let nodes: Vec<String> = sim
        .node_ids()
        .into_iter()
        .filter(|n| sim.role(n) != Some(ott_tree::Role::Server))
        .collect();
    while sim.elapsed() < within {
        sim.run_for(ms(100));
        if nodes.iter().all(|n| sim.node(n).parent("s0").is_some()) {
            return Some(sim.elapsed());
        }
    }
    None
}

#[test]
fn thousand_nodes_converge_loop_free_with_bounded_control_traffic() {
    let id = stream_id_for(SIM_STREAM);
    for seed in [1, 2, 3] {
        let degree = 4;
        let mut sim = Sim::random(&RandomOverlay::new(1000, degree, seed));
        sim.check_loops_each_step(true);
        sim.start();
        let conv = converge(&mut sim, secs(5)).expect("every node gets a parent");
        // A few announcement periods (1 s each).
        eprintln!("seed {seed}: converged in {conv:?}");
        assert!(conv <= secs(3), "seed {seed}: converged in {conv:?}");
        sim.run_until(secs(4));
        // Fail three relays on active paths, one after the other.
        let mut rng = fastrand::Rng::with_seed(seed);
        for _ in 0..3 {
            let active: Vec<String> = active_relays(&sim).into_iter().collect();
            let victim = active[rng.usize(..active.len())].clone();
            sim.kill(&victim);
            sim.run_for(ms(2500));
        }
        let end = sim.elapsed();
        let before: Vec<u64> = sim
            .node_ids()
            .iter()
            .map(|n| sim.control_messages_sent(n))
            .collect();
        sim.run_for(secs(2));
        let span = (sim.elapsed() - end).as_secs_f64();
        for (n, b) in sim.node_ids().iter().zip(before) {
            if !sim.is_running(n) {
                continue;
            }
            let rate = (sim.control_messages_sent(n) - b) as f64 / span;
            let deg = sim.neighbours_of(n).len() as f64;
            // Liveness (a heartbeat and an ack per interval per neighbour) plus 10 per
            // neighbour for announcements, joins and requests.
            let hb = ott_overlay::LivenessConfig::default().heartbeat_interval;
            let per_neighbour = 2.0 / hb.as_secs_f64() + 10.0;
            assert!(
                rate <= per_neighbour * deg + 10.0,
                "seed {seed}: {n} sends {rate:.0} control messages/s with {deg} neighbours"
            );
        }
        assert_eq!(
            sim.stats().loop_violations,
            0,
            "seed {seed}: {:?}",
            sim.first_loop_violation()
        );
        assert!(sim.stats().loop_checks > 100_000);
        sim.check_loop_free().expect("loop free at the end");
        // Every client still plays.
        for c in sim.client_ids() {
            let gap = sim.longest_gap(&c, id, sim.elapsed() - secs(1), sim.elapsed());
            assert!(gap <= ms(300), "seed {seed}: {c} is not playing");
        }
    }
}

#[test]
fn two_servers_kill_the_feeding_one_viewer_continues_from_the_other() {
    let id = stream_id_for(SIM_STREAM);
    let t = topology("two-servers.toml");
    let mut sim = Sim::from_topology(&t, 4);
    sim.add_client("v", &["p1"]);
    sim.select_stream("v", SIM_STREAM);
    sim.check_loops_each_step(true);
    sim.start();
    sim.run_for(secs(5));
    assert!(sim.received("v", id) > 20);
    let path = sim.node("p1").status().path;
    let feeding = path.first().cloned().expect("p1 has a path");
    assert_eq!(feeding, "s1", "p1 takes the stream from the nearer server");
    let before = sim.elapsed();
    sim.kill(&feeding);
    sim.run_for(secs(4));
    let gap = sim.longest_gap("v", id, before - ms(100), sim.elapsed());
    eprintln!("two servers: longest gap {gap:?}");
    assert!(gap <= secs(1), "no media for {gap:?}\n{}", sim.dump_tree());
    assert_eq!(
        sim.node("p1").status().path.first().map(String::as_str),
        Some("s2")
    );
    assert_eq!(
        sim.stats().loop_violations,
        0,
        "{:?}",
        sim.first_loop_violation()
    );
}

#[test]
fn a_client_whose_pop_dies_moves_within_a_second_join_before_leave() {
    let id = stream_id_for(SIM_STREAM);
    let mut sim = seed_with_clients(5);
    sim.start();
    sim.run_for(secs(5));
    let pop = sim.client("v1").pop().expect("attached").to_owned();
    let t = sim.elapsed();
    sim.kill(&pop);
    sim.run_for(secs(3));
    let now = sim.client("v1").pop().expect("attached").to_owned();
    assert_ne!(now, pop);
    let gap = sim.longest_gap("v1", id, t - ms(100), sim.elapsed());
    eprintln!("pop {pop} killed: v1 moved to {now}, longest gap {gap:?}");
    assert!(gap <= secs(1), "no media for {gap:?}");
}

#[test]
fn latency_growth_moves_the_tree_without_flapping() {
    use ott_tree::sim::LinkParams;
    // Two equal paths s0 - a - x and s0 - b - x with jittery links: x must not flap.
    let mut sim = Sim::new(9);
    sim.add_node("s0", ott_tree::Role::Server);
    for n in ["a", "b", "x"] {
        sim.add_node(n, ott_tree::Role::Relay);
    }
    let jittery = LinkParams {
        latency: ms(5),
        jitter: ms(2),
        loss: 0.0,
    };
    for (u, v) in [("s0", "a"), ("s0", "b"), ("a", "x"), ("b", "x")] {
        sim.add_link(u, v, jittery);
    }
    sim.set_catalogue(
        "s0",
        vec![ott_proto::StreamInfo::new(
            "news",
            ott_proto::MediaKind::Mjpeg,
            25_000,
        )],
    );
    sim.start();
    sim.run_for(secs(3));
    let first = sim.node("x").parent("s0").expect("parent").to_owned();
    let changes = sim.node("x").stats().parent_changes;
    sim.run_for(secs(30));
    assert!(
        sim.node("x").stats().parent_changes <= changes + 1,
        "x flapped: {} parent changes",
        sim.node("x").stats().parent_changes - changes
    );
    // The current parent's link becomes much slower: x moves within a few periods.
    let slow = LinkParams {
        latency: ms(40),
        jitter: ms(2),
        loss: 0.0,
    };
    let cur = sim.node("x").parent("s0").expect("parent").to_owned();
    sim.set_link(&cur, "x", slow);
    let t = sim.elapsed();
    let mut moved = None;
    while sim.elapsed() < t + secs(6) {
        sim.run_for(ms(100));
        if sim.node("x").parent("s0") != Some(cur.as_str()) {
            moved = Some(sim.elapsed() - t);
            break;
        }
    }
    let moved = moved.expect("x moved to the faster path");
    assert!(moved <= secs(4), "moved after {moved:?}");
    let _ = first;
}
