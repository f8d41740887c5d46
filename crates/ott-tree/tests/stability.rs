//! A still tree (issue 11): jitter alone does not move it, a real change does, and a
//! node whose parent dies repairs fast. Virtual time, on the simulator.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ott_overlay::Topology;
use ott_tree::sim::{Sim, SIM_STREAM};

fn topology(name: &str) -> Topology {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../topologies")
        .join(name);
    Topology::load(&p).expect("topology loads")
}

/// The seed topology with two viewers given every PoP, and ±`jitter_ms` (a uniform
/// extra 0 to 2×`jitter_ms`) and `loss` added to every link.
fn seed_with(seed: u64, jitter_ms: u64, loss: f64) -> Sim {
    let t = topology("seed.toml");
    let mut sim = Sim::from_topology(&t, seed);
    let pops = sim.pop_ids();
    let pops: Vec<&str> = pops.iter().map(String::as_str).collect();
    for c in ["v1", "v2"] {
        sim.add_client(c, &pops);
        sim.select_stream(c, SIM_STREAM);
    }
    add_jitter(&mut sim, jitter_ms);
    for (a, b) in sim.links() {
        let mut p = sim.link_params(&a, &b).expect("listed link exists");
        p.loss = 1.0 - (1.0 - p.loss) * (1.0 - loss);
        sim.set_link(&a, &b, p);
    }
    sim
}

fn parent_changes(sim: &Sim) -> BTreeMap<String, u64> {
    sim.node_ids()
        .into_iter()
        .map(|n| {
            let c = sim.node(&n).stats().parent_changes;
            (n, c)
        })
        .collect()
}

/// Run `sim` for `d`; the parent changes each node made meanwhile.
fn moves_over(sim: &mut Sim, d: Duration) -> BTreeMap<String, u64> {
    let before = parent_changes(sim);
    sim.run_for(d);
    let after = parent_changes(sim);
    before
        .into_iter()
        .map(|(n, b)| {
            let a = after[&n];
            (n, a - b)
        })
        .collect()
}

/// The seeds of a sweep: `default`, or those of `SEEDS=N` or `SEEDS=A-B` in the
/// environment.
fn seeds_from_env(default: std::ops::RangeInclusive<u64>) -> std::ops::RangeInclusive<u64> {
    let Ok(s) = std::env::var("SEEDS") else {
        return default;
    };
    let (a, b) = s.split_once('-').unwrap_or((&s, &s));
    match (a.parse(), b.parse()) {
        (Ok(a), Ok(b)) => a..=b,
        _ => default,
    }
}

/// Run `sim` for `d` in steps of 100 ms: the parent changes each node made meanwhile,
/// and the shortest time between two changes of one node (`None` if no node changed
/// twice).
fn moves_and_closest(sim: &mut Sim, d: Duration) -> (BTreeMap<String, u64>, Option<Duration>) {
    let start = sim.elapsed();
    let mut last = parent_changes(sim);
    let mut moves: BTreeMap<String, u64> = last.keys().map(|n| (n.clone(), 0)).collect();
    let mut at: BTreeMap<String, Duration> = BTreeMap::new();
    let mut closest: Option<Duration> = None;
    while sim.elapsed() < start + d {
        sim.run_for(Duration::from_millis(100));
        let now = parent_changes(sim);
        for (n, c) in &now {
            let made = c - last.get(n).copied().unwrap_or(0);
            if made == 0 {
                continue;
            }
            *moves.entry(n.clone()).or_default() += made;
            let t = sim.elapsed();
            // Two changes within one step are closer than the step.
            let gap = if made > 1 {
                Some(Duration::ZERO)
            } else {
                at.get(n).map(|p| t - *p)
            };
            if let Some(g) = gap {
                closest = Some(closest.map_or(g, |c| c.min(g)));
            }
            at.insert(n.clone(), t);
        }
        last = now;
    }
    (moves, closest)
}

#[test]
fn jitter_of_20_ms_on_every_link_moves_no_parent_more_than_once_a_minute() {
    for seed in [1, 2] {
        let mut sim = seed_with(seed, 20, 0.0);
        sim.start();
        // Let the tree form and the spreads be measured.
        sim.run_for(Duration::from_secs(20));
        let (moves, closest) = moves_and_closest(&mut sim, Duration::from_secs(300));
        for (n, moves) in moves {
            assert!(
                moves <= 5,
                "seed {seed}: {n} changed parent {moves} times in 5 minutes of jitter alone ({:?})",
                sim.node(&n).stats()
            );
        }
        // Seed 1 once moved a node twice in 57 s: a high of the jitter was taken for a
        // real change of the route.
        assert!(
            closest.is_none_or(|c| c >= Duration::from_secs(60)),
            "seed {seed}: a node changed parent twice within {closest:?}"
        );
        sim.check_loop_free().expect("loop free");
    }
}

/// Jitter that starts on every link at once, after the tree formed without any: the
/// spreads measured so far are near zero, and the first jittered heartbeat of one link
/// must not move a node before the other links' jitter shows.
#[test]
fn jitter_starting_after_the_tree_formed_moves_no_parent_more_than_once_a_minute() {
    for seed in [1, 2, 14, 17] {
        let mut sim = seed_with(seed, 0, 0.0);
        sim.start();
        sim.run_for(Duration::from_secs(20));
        add_jitter(&mut sim, 20);
        for (n, moves) in moves_over(&mut sim, Duration::from_secs(60)) {
            // The simulator's jitter is an extra delay of 0 to 2×20 ms: it raises the
            // mean, more on longer paths, so one move is a real change.
            assert!(
                moves <= 1,
                "seed {seed}: {n} changed parent {moves} times in the first minute of jitter ({:?})",
                sim.node(&n).stats()
            );
        }
        sim.check_loop_free().expect("loop free");
    }
}

/// Add ±`jitter_ms` (a uniform extra 0 to 2×`jitter_ms`) to every link.
fn add_jitter(sim: &mut Sim, jitter_ms: u64) {
    for (a, b) in sim.links() {
        let mut p = sim.link_params(&a, &b).expect("listed link exists");
        p.jitter += Duration::from_millis(2 * jitter_ms);
        sim.set_link(&a, &b, p);
    }
}

#[test]
fn a_link_20_ms_slower_moves_the_tree_within_2_s_despite_jitter() {
    // n14 reaches s1 in two hops through n12 (2 + 2 ms) or n13 (2 + 3 ms): with the
    // link to its parent 20 ms slower, the other way is 19 ms better and n14 must move.
    for seed in [1, 2] {
        let mut sim = seed_with(seed, 20, 0.0);
        sim.start();
        sim.run_for(Duration::from_secs(20));
        let old = sim.node("n14").parent("s1").map(str::to_owned);
        let old = old.unwrap_or_else(|| panic!("n14 has no parent:\n{}", sim.dump_tree()));
        let mut p = sim
            .link_params("n14", &old)
            .expect("link to the parent exists");
        p.latency += Duration::from_millis(20);
        sim.set_link("n14", &old, p);
        let at = sim.elapsed();
        let mut moved = None;
        while sim.elapsed() < at + Duration::from_secs(2) {
            sim.run_for(Duration::from_millis(10));
            if sim.node("n14").parent("s1") != Some(old.as_str()) {
                moved = Some(sim.elapsed() - at);
                break;
            }
        }
        let moved = moved.unwrap_or_else(|| {
            panic!(
                "seed {seed}: n14 still on {old} 2 s later:\n{}",
                sim.dump_tree()
            )
        });
        assert!(moved <= Duration::from_secs(2), "moved after {moved:?}");
    }
}

#[test]
fn viewers_keep_their_pop_under_5_percent_loss() {
    let mut sim = seed_with(3, 0, 0.05);
    sim.start();
    sim.run_for(Duration::from_secs(20));
    let before: Vec<u64> = ["v1", "v2"]
        .iter()
        .map(|c| sim.client(c).pop_switches())
        .collect();
    sim.run_for(Duration::from_secs(300));
    for (c, b) in ["v1", "v2"].iter().zip(before) {
        let switches = sim.client(c).pop_switches() - b;
        assert!(
            switches <= 5,
            "{c} switched PoP {switches} times in 5 minutes of 5 % loss"
        );
    }
}

#[test]
fn viewers_keep_their_pop_under_20_ms_of_jitter() {
    for seed in [1, 2] {
        let mut sim = seed_with(seed, 20, 0.0);
        sim.start();
        sim.run_for(Duration::from_secs(20));
        let before: Vec<u64> = ["v1", "v2"]
            .iter()
            .map(|c| sim.client(c).pop_switches())
            .collect();
        sim.run_for(Duration::from_secs(300));
        for (c, b) in ["v1", "v2"].iter().zip(before) {
            let switches = sim.client(c).pop_switches() - b;
            assert!(
                switches <= 5,
                "seed {seed}: {c} switched PoP {switches} times in 5 minutes of ±20 ms jitter"
            );
        }
    }
}

/// How long n14 takes to leave a parent whose link became 20 ms slower (at most
/// `limit`), or `None` if it has no parent.
fn n14_moves_after_a_real_change(sim: &mut Sim, limit: Duration) -> Option<Duration> {
    let old = sim.node("n14").parent("s1").map(str::to_owned)?;
    let mut p = sim.link_params("n14", &old).expect("link to the parent");
    p.latency += Duration::from_millis(20);
    sim.set_link("n14", &old, p);
    let at = sim.elapsed();
    while sim.elapsed() < at + limit {
        sim.run_for(Duration::from_millis(10));
        if sim.node("n14").parent("s1") != Some(old.as_str()) {
            return Some(sim.elapsed() - at);
        }
    }
    Some(limit)
}

/// The figures of docs/performance.md's "still tree" table over many seeds (not a CI
/// test: `cargo test --release -p ott-tree --test stability -- --ignored --nocapture`).
/// For each seed: how long n14 takes to leave a parent whose link became 20 ms slower
/// 20 s after start (limit 10 s); in a second run, the most parent changes of any node
/// and PoP switches of any viewer in 2 minutes of ±20 ms jitter alone (after 20 s to
/// form), then the same change.
/// Seeds 1 to 24, or those of `SEEDS=N` or `SEEDS=A-B` in the environment.
#[test]
#[ignore = "a measurement, printed; run by hand"]
fn sweep_of_seeds_jitter_and_a_real_change() {
    let limit = Duration::from_secs(10);
    let two = Duration::from_secs(2);
    let (mut early_within, mut late_within) = (0, 0);
    let (mut early_slowest, mut late_slowest) = (Duration::ZERO, Duration::ZERO);
    let (mut most_moves, mut most_switches) = (0, 0);
    let mut closest_of_all: Option<Duration> = None;
    let seeds = seeds_from_env(1..=24);
    let n = seeds.clone().count();
    for seed in seeds {
        let mut sim = seed_with(seed, 20, 0.0);
        sim.start();
        sim.run_for(Duration::from_secs(20));
        let early = n14_moves_after_a_real_change(&mut sim, limit).unwrap_or(limit);
        let mut sim = seed_with(seed, 20, 0.0);
        sim.start();
        sim.run_for(Duration::from_secs(20));
        let switches_before: Vec<u64> = ["v1", "v2"]
            .iter()
            .map(|c| sim.client(c).pop_switches())
            .collect();
        let (moves, closest) = moves_and_closest(&mut sim, Duration::from_secs(120));
        let moves = moves.into_values().max().unwrap_or(0);
        if let Some(c) = closest {
            closest_of_all = Some(closest_of_all.map_or(c, |a: Duration| a.min(c)));
        }
        let switches = ["v1", "v2"]
            .iter()
            .zip(switches_before)
            .map(|(c, b)| sim.client(c).pop_switches() - b)
            .max()
            .unwrap_or(0);
        most_switches = most_switches.max(switches);
        let late = n14_moves_after_a_real_change(&mut sim, limit).unwrap_or(limit);
        most_moves = most_moves.max(moves);
        early_within += usize::from(early <= two);
        late_within += usize::from(late <= two);
        early_slowest = early_slowest.max(early);
        late_slowest = late_slowest.max(late);
        println!(
            "seed {seed}: n14 moved after {early:?} (at 20 s); most parent changes of a node in 2 min {moves} (closest two {closest:?}), PoP switches of a viewer {switches}; n14 moved after {late:?} (at 140 s)"
        );
    }
    println!(
        "n14 moved within 2 s: at 20 s on {early_within} of {n} seeds (slowest {early_slowest:?}), at 140 s on {late_within} of {n} (slowest {late_slowest:?}); most in 2 min of jitter: parent changes of a node {most_moves} (closest two of a node {closest_of_all:?}), PoP switches of a viewer {most_switches}"
    );
}

/// Jitter that starts after the tree formed without it, as in the emulation scenario
/// `seed-jitter20` (the spreads measured so far are near zero when it starts): the most
/// parent changes of any node in the first minute of ±20 ms, for each seed (not a CI
/// test: `cargo test --release -p ott-tree --test stability -- --ignored --nocapture
/// jitter_onset`). Seeds 1 to 24, or those of `SEEDS=N` or `SEEDS=A-B`.
#[test]
#[ignore = "a measurement, printed; run by hand"]
fn sweep_of_seeds_jitter_onset() {
    let seeds = seeds_from_env(1..=24);
    let mut worst = 0;
    let mut over = 0;
    let n = seeds.clone().count();
    for seed in seeds {
        let mut sim = seed_with(seed, 0, 0.0);
        sim.start();
        sim.run_for(Duration::from_secs(20));
        add_jitter(&mut sim, 20);
        let (node, moves) = moves_over(&mut sim, Duration::from_secs(60))
            .into_iter()
            .max_by_key(|(_, m)| *m)
            .unwrap_or_default();
        worst = worst.max(moves);
        over += usize::from(moves > 1);
        println!("seed {seed}: most parent changes of a node in the first minute of jitter {moves} ({node})");
    }
    println!(
        "jitter onset: {over} of {n} seeds had a node change parent more than once; most {worst}"
    );
}
