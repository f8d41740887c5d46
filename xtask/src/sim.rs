//! `cargo xtask sim`: a random overlay of N nodes in the deterministic simulator.
//!
//! Builds a random connected overlay (one server, relays, PoPs, clients watching one
//! stream), lets the tree form, then kills random relays on active paths one after the
//! other, checking loop freedom after every step, and prints convergence time, loop
//! checks, failover times (median, p99, max) and control messages per node per second.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ott_proto::stream_id_for;
use ott_tree::sim::{RandomOverlay, Sim, SIM_STREAM};
use ott_tree::Role;

#[derive(clap::Args)]
pub(crate) struct SimArgs {
    /// Overlay nodes, the server included.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Seed of the graph, the links and every node: the same seed gives the same run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Average number of overlay neighbours per node.
    #[arg(long, default_value_t = 4)]
    degree: usize,
    /// Relays on active paths to kill, one after the other.
    #[arg(long, default_value_t = 10)]
    failures: usize,
    /// Viewers, each given three random PoPs.
    #[arg(long, default_value_t = 50)]
    clients: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// (median, p99, max) of `v`, sorted in place.
fn dist(v: &mut [Duration]) -> Option<(Duration, Duration, Duration)> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some((at(0.5), at(0.99), v[v.len() - 1]))
}

fn print_dist(what: &str, v: &mut [Duration]) {
    match dist(v) {
        Some((m, p, x)) => println!(
            "{what:<34} n={:<5} median={:>6.0} ms  p99={:>6.0} ms  max={:>6.0} ms",
            v.len(),
            ms(m),
            ms(p),
            ms(x)
        ),
        None => println!("{what:<34} none affected"),
    }
}

pub(crate) fn run(args: SimArgs) -> anyhow::Result<()> {
    if args.nodes < 3 {
        anyhow::bail!("--nodes must be at least 3 (a server and two others)");
    }
    let wall = Instant::now();
    let mut p = RandomOverlay::new(args.nodes, args.degree, args.seed);
    p.clients = args.clients;
    let mut sim = Sim::random(&p);
    // Fine-grained media, so that outages are measured to 20 ms.
    sim.set_media_period(Duration::from_millis(20));
    sim.check_loops_each_step(true);
    let nodes: Vec<String> = sim.node_ids();
    let node_links = sim
        .links()
        .iter()
        .filter(|(a, b)| sim.role(a).is_some() && sim.role(b).is_some())
        .count();
    let pops = sim.pop_ids().len();
    println!(
        "overlay: {} nodes ({} PoPs), {} links (average degree {:.1}), {} clients, seed {}",
        nodes.len(),
        pops,
        node_links,
        2.0 * node_links as f64 / nodes.len() as f64,
        args.clients,
        args.seed
    );
    let stream = stream_id_for(SIM_STREAM);
    sim.start();
    let relays: Vec<String> = nodes
        .iter()
        .filter(|n| sim.role(n) != Some(Role::Server))
        .cloned()
        .collect();
    let mut converged = None;
    while sim.elapsed() < Duration::from_secs(20) {
        sim.run_for(Duration::from_millis(50));
        if relays.iter().all(|n| sim.node(n).parent("s0").is_some()) {
            converged = Some(sim.elapsed());
            break;
        }
    }
    match converged {
        Some(t) => println!(
            "convergence: every node has a parent after {:.0} ms (announcements every 1 s)",
            ms(t)
        ),
        None => println!("convergence: NOT converged within 20 s"),
    }
    sim.run_until(Duration::from_secs(5));
    // Control traffic in a quiet window.
    let before: Vec<u64> = nodes.iter().map(|n| sim.control_messages_sent(n)).collect();
    let t0 = sim.elapsed();
    sim.run_for(Duration::from_secs(3));
    let span = (sim.elapsed() - t0).as_secs_f64();
    let mut total = 0.0;
    let mut worst_per_degree: f64 = 0.0;
    let mut worst = (0.0, 0usize, String::new());
    for (n, b) in nodes.iter().zip(before) {
        let rate = (sim.control_messages_sent(n) - b) as f64 / span;
        let deg = sim.neighbours_of(n).len().max(1);
        total += rate;
        worst_per_degree = worst_per_degree.max(rate / deg as f64);
        if rate > worst.0 {
            worst = (rate, deg, n.clone());
        }
    }
    println!(
        "control traffic: {:.1} messages/s per node on average; at most {:.1} per neighbour per second; busiest {} sends {:.0}/s with {} neighbours",
        total / nodes.len() as f64,
        worst_per_degree,
        worst.2,
        worst.0,
        worst.1
    );
    // Failures.
    let mut rng = fastrand_like(args.seed);
    let mut tree_repair = Vec::new();
    let mut outages = Vec::new();
    let mut killed = Vec::new();
    for _ in 0..args.failures {
        let mut active = BTreeSet::new();
        for c in sim.client_ids() {
            if let Some(pop) = sim.client(&c).pop() {
                for n in sim.node(pop).status().path {
                    if sim.role(&n) == Some(Role::Relay) || sim.role(&n) == Some(Role::Pop) {
                        active.insert(n);
                    }
                }
            }
        }
        let active: Vec<String> = active.into_iter().collect();
        if active.is_empty() {
            break;
        }
        let victim = active[(rng() % active.len() as u64) as usize].clone();
        let affected_nodes: Vec<String> = nodes
            .iter()
            .filter(|n| {
                sim.try_node(n)
                    .is_some_and(|x| **n != victim && x.status().path.contains(&victim))
            })
            .cloned()
            .collect();
        let affected_clients: Vec<String> = sim
            .client_ids()
            .into_iter()
            .filter(|c| {
                sim.client(c)
                    .pop()
                    .and_then(|p| sim.try_node(p))
                    .is_some_and(|x| x.status().path.contains(&victim))
            })
            .collect();
        let at = sim.elapsed();
        sim.kill(&victim);
        killed.push(victim.clone());
        let mut pending: Vec<String> = affected_nodes;
        while sim.elapsed() < at + Duration::from_secs(3) {
            sim.run_for(Duration::from_millis(10));
            pending.retain(|n| {
                let ok = sim.try_node(n).is_none_or(|x| {
                    let st = x.status();
                    st.parent.is_some() && !st.path.contains(&victim)
                }) || !sim.connected(n, "s0");
                if ok {
                    tree_repair.push(sim.elapsed() - at);
                }
                !ok
            });
        }
        for n in &pending {
            println!("  {n} still has no route 3 s after {victim} died");
        }
        for c in affected_clients {
            let gap = sim.longest_gap(&c, stream, at, at + Duration::from_secs(3));
            outages.push(gap);
        }
    }
    println!("killed: {}", killed.join(" "));
    print_dist("tree repair (nodes below the dead)", &mut tree_repair);
    print_dist("viewer outage (affected clients)", &mut outages);
    let st = sim.stats();
    println!(
        "loop checks: {} (after every step, from the host that changed), violations: {}{}",
        st.loop_checks,
        st.loop_violations,
        sim.first_loop_violation()
            .map(|v| format!(" (first: {v})"))
            .unwrap_or_default()
    );
    let final_check = sim.check_loop_free();
    println!(
        "final whole-network check: {}",
        match &final_check {
            Ok(()) => "loop free".to_owned(),
            Err(e) => e.clone(),
        }
    );
    println!(
        "simulated {:.1} s in {:.1} s ({} steps, {} control datagrams)",
        sim.elapsed().as_secs_f64(),
        wall.elapsed().as_secs_f64(),
        st.steps,
        st.control_sent
    );
    if st.loop_violations > 0 || final_check.is_err() {
        anyhow::bail!("the loop-freedom invariant was broken");
    }
    Ok(())
}

/// A tiny deterministic generator (SplitMix64), to pick victims from the seed.
fn fastrand_like(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed ^ 0x5151_0000_7171;
    move || {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
