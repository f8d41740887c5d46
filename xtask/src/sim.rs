//! `cargo xtask sim`: an overlay in the deterministic simulator.
//!
//! Builds either a random connected overlay of N nodes (one server `s0`, relays, PoPs,
//! viewers watching one stream) or the overlay of a topology file (its servers, relays,
//! PoPs and overlay pairs, as `Sim::from_topology` builds it, with one viewer per client
//! of the file given every PoP), lets the tree form, then kills relays on viewers'
//! stream paths one after the other (never a server or a PoP; preferably a relay whose
//! loss leaves every PoP a path to a server), checking loop freedom after every step,
//! and prints convergence time, loop checks, failover times (median, p99, max) and
//! control messages per node per second. Media runs through the real data plane (see
//! `ott_tree::sim`): the server makes a frame of two datagrams every `--frame-ms`, and
//! the report gives the frames the viewers played intact against those made while they
//! were attached, the longest gap in played frames and the frames lost per kill. Nodes and viewers a kill cuts off from every
//! server are counted apart. When no relay is on a viewer's path (a tiny overlay, a
//! topology without relays or viewers) it says so and kills nothing. `--threads`
//! (default: one per core) steps the simulation on that many threads, with the same
//! output.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use ott_overlay::Topology;
use ott_proto::stream_id_for;
use ott_tree::sim::{MediaParams, RandomOverlay, Sim, SIM_STREAM};
use ott_tree::Role;

/// Viewers of the random overlay when `--clients` is not given.
const DEFAULT_CLIENTS: usize = 50;

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct SimArgs {
    /// Simulate this topology file's overlay (servers, relays, PoPs, overlay pairs; one
    /// viewer per client of the file, given every PoP) instead of a random one.
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// Nodes of the random overlay, the server included (at least 2).
    #[arg(long, default_value_t = 1000, conflicts_with = "topology")]
    nodes: usize,
    /// Seed of the graph, the links and every node: the same seed gives the same run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Average number of overlay neighbours per node of the random overlay (at least 2;
    /// more than the other nodes gives the complete graph).
    #[arg(long, default_value_t = 4, conflicts_with = "topology")]
    degree: usize,
    /// Relays on viewers' stream paths to kill, one after the other (servers and PoPs
    /// are never killed). Fewer are killed when fewer such relays are left.
    #[arg(long, default_value_t = 10)]
    failures: usize,
    /// Viewers. Random overlay: each given three random PoPs (default 50). Topology:
    /// this many viewers given every PoP, instead of one per client of the file.
    #[arg(long)]
    clients: Option<usize>,
    /// Jitter added to every link (viewers' access links too): each datagram is delayed
    /// by an extra uniform 0 to 2×MS, i.e. ±MS around a mean raised by MS.
    #[arg(long, value_name = "MS", default_value_t = 0.0)]
    jitter_ms: f64,
    /// Random loss added to every link (viewers' access links too), in percent.
    #[arg(
        long,
        visible_alias = "loss",
        value_name = "PCT",
        default_value_t = 0.0
    )]
    loss_pct: f64,
    /// Before the kills, watch the still network for this many seconds and report
    /// parent changes per node per minute and PoP switches per viewer per minute.
    #[arg(long, value_name = "S", default_value_t = 0)]
    stability_s: u64,
    /// Nodes are told when their upstream's media stopped for this long (the data
    /// plane's silence hint); 0 turns the hint off.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    silence_ms: u64,
    /// Time between two frames of the stream (each of two datagrams, through the real
    /// packetizer, data planes and playout buffers); outages are measured to this.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    frame_ms: u64,
    /// Threads stepping the simulation (0: one per core; never more than the cores,
    /// which would only wait on each other). The output is the same with any number.
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,
}

impl Default for SimArgs {
    fn default() -> Self {
        Self {
            topology: None,
            nodes: 1000,
            seed: 1,
            degree: 4,
            failures: 10,
            clients: None,
            jitter_ms: 0.0,
            loss_pct: 0.0,
            stability_s: 0,
            silence_ms: 100,
            frame_ms: 20,
            threads: 0,
        }
    }
}

/// What a run found, for the exit status and the tests.
#[derive(Debug, Default)]
pub(crate) struct SimReport {
    /// Overlay nodes by role.
    pub(crate) roles: BTreeMap<String, Role>,
    /// Viewers watching the stream.
    pub(crate) viewers: usize,
    /// When every node had a route to every server it can reach, if it happened.
    pub(crate) converged: Option<Duration>,
    /// The killed nodes, in order.
    pub(crate) killed: Vec<String>,
    /// Nodes on the dead relay's side that reached no server any more after a kill.
    pub(crate) nodes_cut_off: BTreeSet<String>,
    /// Viewers none of whose PoPs reached a server after a kill.
    pub(crate) cut_off: BTreeSet<String>,
    /// Why fewer than `--failures` were killed, if so.
    pub(crate) fewer_kills: Option<String>,
    pub(crate) loop_violations: u64,
    /// What the final whole-network check found, if anything.
    pub(crate) final_violation: Option<String>,
    /// Frames played intact by the viewers, and frames made while they were attached.
    pub(crate) frames: (u64, u64),
    /// Viewers that played media.
    pub(crate) media_viewers: usize,
    /// Frames each affected viewer (with media) lost to each kill.
    pub(crate) frames_lost: Vec<u64>,
}

/// `1 relay`, `3 relays`.
fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
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

fn print_dist(out: &mut dyn Write, what: &str, v: &mut [Duration]) -> std::io::Result<()> {
    match dist(v) {
        Some((m, p, x)) => writeln!(
            out,
            "{what:<34} n={:<5} median={:>6.0} ms  p99={:>6.0} ms  max={:>6.0} ms",
            v.len(),
            ms(m),
            ms(p),
            ms(x)
        ),
        None => writeln!(out, "{what:<34} none affected"),
    }
}

pub(crate) fn run(args: SimArgs) -> anyhow::Result<()> {
    let args = SimArgs {
        threads: threads(args.threads),
        ..args
    };
    let mut out = std::io::stdout().lock();
    let report = simulate(&args, &mut out)?;
    if report.loop_violations > 0 || report.final_violation.is_some() {
        anyhow::bail!("the loop-freedom invariant was broken");
    }
    Ok(())
}

/// Longest jitter `--jitter-ms` takes, ms: a minute, beyond any network worth simulating.
const MAX_JITTER_MS: f64 = 60_000.0;

/// Refuses flags that make no sense, naming the flag, rather than bending them into
/// something else in silence.
fn check_args(args: &SimArgs) -> anyhow::Result<()> {
    if !(0.0..=100.0).contains(&args.loss_pct) {
        anyhow::bail!(
            "--loss-pct must be a percentage from 0 to 100, got {}",
            args.loss_pct
        );
    }
    if !(0.0..=MAX_JITTER_MS).contains(&args.jitter_ms) {
        anyhow::bail!(
            "--jitter-ms must be from 0 to {MAX_JITTER_MS} ms, got {}",
            args.jitter_ms
        );
    }
    if !(1..=60_000).contains(&args.frame_ms) {
        anyhow::bail!(
            "--frame-ms must be from 1 to 60000 ms, got {}",
            args.frame_ms
        );
    }
    if args.silence_ms > 60_000 {
        anyhow::bail!(
            "--silence-ms must be from 0 (off) to 60000 ms, got {}",
            args.silence_ms
        );
    }
    if args.stability_s > 86_400 {
        anyhow::bail!(
            "--stability-s must be at most 86400 (a simulated day), got {}",
            args.stability_s
        );
    }
    if args.topology.is_none() {
        if args.nodes < 2 {
            anyhow::bail!(
                "--nodes must be at least 2 (a server and a PoP), got {}",
                args.nodes
            );
        }
        check_memory(
            args.nodes,
            args.clients.unwrap_or(DEFAULT_CLIENTS),
            available_memory(),
        )?;
        if args.degree < 2 {
            anyhow::bail!(
                "--degree must be at least 2: the random overlay is connected, and a \
                 spanning tree alone gives each node nearly 2 neighbours on average; got {}",
                args.degree
            );
        }
    }
    Ok(())
}

/// Memory a simulated host takes at most, bytes: 41-66 kB a node at 10,000 and 100,000
/// nodes, about 52 kB a viewer (4,000 viewers on 100 nodes: 265 MB at most against 60 MB
/// with 50), measured with `/usr/bin/time -f %M`.
const BYTES_PER_HOST: u64 = 64 * 1024;

/// Refuses a random overlay that would not fit in `available` bytes (the machine's
/// `MemAvailable`, when known), naming the flags: an allocation failure aborts the
/// whole process with no word of why, after the time it took to get there.
fn check_memory(nodes: usize, viewers: usize, available: Option<u64>) -> anyhow::Result<()> {
    let hosts = (nodes as u64).saturating_add(viewers as u64);
    let needed = hosts.saturating_mul(BYTES_PER_HOST);
    match available {
        Some(free) if needed > free => anyhow::bail!(
            "{nodes} nodes (--nodes) and {viewers} viewers (--clients) need about {:.1} GB of \
             memory (about {} kB each), and this machine has {:.1} GB available",
            needed as f64 / 1e9,
            BYTES_PER_HOST / 1024,
            free as f64 / 1e9
        ),
        _ => Ok(()),
    }
}

/// The machine's available memory in bytes (`MemAvailable` of `/proc/meminfo`), if known.
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Threads to step the run with: `--threads`, 0 for one per core, and never more than
/// the cores, since the threads meet at a barrier every window of virtual time and one
/// waiting for a core holds up the others (64 threads on 2 cores did not finish a
/// 60-node run in 30 s, which 2 ran in 1 s). The output is the same with any number.
fn threads(requested: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    match requested {
        0 => cores,
        n => n.min(cores),
    }
}

/// The network to simulate and the line that describes it.
fn build(args: &SimArgs) -> anyhow::Result<(Sim, String)> {
    let Some(file) = &args.topology else {
        let mut p = RandomOverlay::new(args.nodes, args.degree, args.seed);
        p.clients = args.clients.unwrap_or(DEFAULT_CLIENTS);
        return Ok((Sim::random(&p), "random overlay".to_owned()));
    };
    // As given, else relative to the workspace root (where `cargo xtask` is usually run).
    let path = if file.exists() {
        file.clone()
    } else {
        crate::project_root().join(file)
    };
    let t = Topology::load(&path)
        .with_context(|| format!("cannot simulate the topology {}", file.display()))?;
    let mut sim = Sim::from_topology(&t, args.seed);
    let pops = sim.pop_ids();
    let pops: Vec<&str> = pops.iter().map(String::as_str).collect();
    if !pops.is_empty() {
        let viewers: Vec<String> = match args.clients {
            Some(k) => {
                let taken = |id: &str| t.node(id).is_some();
                (0..)
                    .map(|i| format!("v{i}"))
                    .filter(|id| !taken(id))
                    .take(k)
                    .collect()
            }
            None => t.clients().iter().map(|c| c.id.clone()).collect(),
        };
        for v in viewers {
            sim.add_client(&v, &pops);
            sim.select_stream(&v, SIM_STREAM);
        }
    }
    Ok((sim, format!("topology {} ({})", t.name, file.display())))
}

/// For every node, the servers it reaches over the overlay links (all up).
fn reachable_servers(sim: &Sim, adj: &Adjacency) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in sim.ids_with_role(Role::Server) {
        let Some(&si) = adj.index.get(&s) else {
            continue;
        };
        let mut seen = vec![false; adj.ids.len()];
        seen[si] = true;
        let mut queue = VecDeque::from([si]);
        while let Some(x) = queue.pop_front() {
            for &y in &adj.next[x] {
                if !seen[y] {
                    seen[y] = true;
                    queue.push_back(y);
                }
            }
        }
        for (n, _) in adj.ids.iter().zip(&seen).filter(|(_, &r)| r) {
            out.entry(n.clone()).or_default().push(s.clone());
        }
    }
    out
}

/// Running relays on the stream path of a viewer's PoP.
fn relays_on_viewer_paths(sim: &Sim) -> BTreeSet<String> {
    let stream = stream_id_for(SIM_STREAM);
    let mut active = BTreeSet::new();
    for c in sim.client_ids() {
        if !sim.is_running(&c) {
            continue;
        }
        if let Some(pop) = sim.client(&c).pop() {
            for n in sim.stream_path(pop, stream) {
                if sim.role(&n) == Some(Role::Relay) {
                    active.insert(n);
                }
            }
        }
    }
    active
}

/// Overlay adjacency of the nodes (clients left out), by index into `ids` (the sorted
/// node ids), built once: `Sim::neighbours_of` scans every link, and walks over sets of
/// ids cost a string comparison per step.
struct Adjacency {
    ids: Vec<String>,
    index: HashMap<String, usize>,
    next: Vec<Vec<usize>>,
}

fn adjacency(sim: &Sim) -> Adjacency {
    let ids = sim.node_ids();
    let index: HashMap<String, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), i))
        .collect();
    let mut next = vec![Vec::new(); ids.len()];
    for (a, b) in sim.links() {
        if let (Some(&x), Some(&y)) = (index.get(&a), index.get(&b)) {
            next[x].push(y);
            next[y].push(x);
        }
    }
    Adjacency { ids, index, next }
}

/// Which nodes run and which links are up, at one moment (`up[x][k]` is the link from
/// `x` to `next[x][k]`).
struct Live {
    running: Vec<bool>,
    up: Vec<Vec<bool>>,
}

impl Adjacency {
    fn indices(&self, ids: &[String]) -> Vec<usize> {
        ids.iter()
            .filter_map(|id| self.index.get(id).copied())
            .collect()
    }

    fn live(&self, sim: &Sim) -> Live {
        Live {
            running: self.ids.iter().map(|id| sim.is_running(id)).collect(),
            up: self
                .next
                .iter()
                .enumerate()
                .map(|(x, ys)| {
                    ys.iter()
                        .map(|&y| sim.link_is_up(&self.ids[x], &self.ids[y]))
                        .collect()
                })
                .collect(),
        }
    }

    /// The running nodes that reach a running server (through running nodes and up
    /// links), leaving `without` out.
    fn reach_servers(&self, live: &Live, servers: &[usize], without: Option<usize>) -> Vec<bool> {
        let mut seen = vec![false; self.ids.len()];
        let mut queue = VecDeque::new();
        for &s in servers {
            if live.running[s] && Some(s) != without && !seen[s] {
                seen[s] = true;
                queue.push_back(s);
            }
        }
        while let Some(x) = queue.pop_front() {
            for (k, &y) in self.next[x].iter().enumerate() {
                if Some(y) != without && live.running[y] && live.up[x][k] && !seen[y] {
                    seen[y] = true;
                    queue.push_back(y);
                }
            }
        }
        seen
    }

    /// Whether `id` is in `set` (a result of [`Adjacency::reach_servers`]).
    fn contains(&self, set: &[bool], id: &str) -> bool {
        self.index.get(id).is_some_and(|&i| set[i])
    }

    /// Whether killing `victim` would leave some running PoP of `pops` that reaches a
    /// server in `now` (what [`Adjacency::reach_servers`] gives without a kill) with no
    /// path to any server.
    fn cuts_off_a_pop(
        &self,
        live: &Live,
        now: &[bool],
        victim: &str,
        servers: &[usize],
        pops: &[usize],
    ) -> bool {
        let after = self.reach_servers(live, servers, self.index.get(victim).copied());
        pops.iter().any(|&p| now[p] && !after[p])
    }
}

/// Whether killing `victim` would leave some running PoP that now reaches a server
/// with no path to any server (through running nodes and up links).
#[cfg(test)]
fn would_cut_off_a_pop(sim: &Sim, adj: &Adjacency, victim: &str, servers: &[String]) -> bool {
    let live = adj.live(sim);
    let servers = adj.indices(servers);
    let now = adj.reach_servers(&live, &servers, None);
    adj.cuts_off_a_pop(&live, &now, victim, &servers, &adj.indices(&sim.pop_ids()))
}

/// Run the experiment, writing the report to `out`.
pub(crate) fn simulate(args: &SimArgs, out: &mut dyn Write) -> anyhow::Result<SimReport> {
    let wall = Instant::now();
    check_args(args)?;
    let (mut sim, what) = build(args)?;
    // As asked: the tests split small networks into more parts than this machine's
    // cores to check that the output does not change; the command line caps it first.
    sim.threads = match args.threads {
        0 => threads(0),
        n => n,
    };
    // Fine-grained media, so that outages are measured to a frame (20 ms by default).
    let frame = Duration::from_millis(args.frame_ms);
    sim.set_media(MediaParams {
        period: frame,
        ..MediaParams::default()
    });
    sim.set_silence_hint((args.silence_ms > 0).then(|| Duration::from_millis(args.silence_ms)));
    if args.jitter_ms > 0.0 || args.loss_pct > 0.0 {
        let extra_jitter = Duration::from_secs_f64(2.0 * args.jitter_ms / 1e3);
        let extra_loss = args.loss_pct / 100.0;
        for (a, b) in sim.links() {
            if let Some(mut p) = sim.link_params(&a, &b) {
                p.jitter += extra_jitter;
                p.loss = 1.0 - (1.0 - p.loss) * (1.0 - extra_loss);
                sim.set_link(&a, &b, p);
            }
        }
        writeln!(
            out,
            "every link: +{} ms jitter (±{} ms), +{} % loss",
            2.0 * args.jitter_ms,
            args.jitter_ms,
            args.loss_pct
        )?;
    }
    sim.check_loops_each_step(true);
    let nodes: Vec<String> = sim.node_ids();
    let mut report = SimReport {
        roles: nodes
            .iter()
            .filter_map(|n| Some((n.clone(), sim.role(n)?)))
            .collect(),
        viewers: sim.client_ids().len(),
        ..SimReport::default()
    };
    let count = |r: Role| report.roles.values().filter(|&&x| x == r).count();
    let (servers, relays, pops) = (count(Role::Server), count(Role::Relay), count(Role::Pop));
    let node_links = sim
        .links()
        .iter()
        .filter(|(a, b)| sim.role(a).is_some() && sim.role(b).is_some())
        .count();
    writeln!(
        out,
        "{what}: {} nodes ({}, {}, {}), {} links (average degree {:.1}), {}, seed {}",
        nodes.len(),
        plural(servers, "server"),
        plural(relays, "relay"),
        plural(pops, "PoP"),
        node_links,
        2.0 * node_links as f64 / nodes.len().max(1) as f64,
        plural(report.viewers, "viewer"),
        args.seed
    )?;
    let stream = stream_id_for(SIM_STREAM);
    let adj = adjacency(&sim);
    let reach = reachable_servers(&sim, &adj);
    let no_servers = Vec::new();
    let server_of = |n: &String| reach.get(n).unwrap_or(&no_servers);
    sim.start();
    let below: Vec<String> = nodes
        .iter()
        .filter(|n| sim.role(n) != Some(Role::Server))
        .cloned()
        .collect();
    while sim.elapsed() < Duration::from_secs(20) {
        sim.run_for(Duration::from_millis(50));
        let routed = |n: &String| {
            sim.try_node(n)
                .is_some_and(|x| server_of(n).iter().all(|s| x.parent(s).is_some()))
        };
        if below.iter().all(routed) {
            report.converged = Some(sim.elapsed());
            break;
        }
    }
    match report.converged {
        Some(t) => writeln!(
            out,
            "convergence: every node has a route to every server after {:.0} ms (announcements every 1 s)",
            ms(t)
        )?,
        None => writeln!(out, "convergence: NOT converged within 20 s")?,
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
    writeln!(
        out,
        "control traffic: {:.1} messages/s per node on average; at most {:.1} per neighbour per second; busiest {} sends {:.0}/s with {} neighbours",
        total / nodes.len().max(1) as f64,
        worst_per_degree,
        worst.2,
        worst.0,
        worst.1
    )?;
    if args.stability_s > 0 {
        stability(&mut sim, args.stability_s, out)?;
    }
    // Failures: only relays on a viewer's stream path.
    let mut rng = fastrand_like(args.seed);
    let mut tree_repair = Vec::new();
    let mut outages = Vec::new();
    // (viewer, time of the kill): frames lost are counted at the end, once every frame
    // of the window has arrived or been given up.
    let mut hit: Vec<(String, Duration)> = Vec::new();
    let nothing_to_kill = if args.failures == 0 {
        Some("--failures 0".to_owned())
    } else if relays == 0 {
        Some(format!(
            "the overlay has no relay ({} nodes: {}, {}); it is too small for kills{}",
            nodes.len(),
            plural(servers, "server"),
            plural(pops, "PoP"),
            if args.topology.is_none() {
                ", try --nodes 5 or more"
            } else {
                ""
            }
        ))
    } else if report.viewers == 0 {
        Some(if pops == 0 {
            "the overlay has no PoP, so no viewer and no relay on a viewer's path".to_owned()
        } else {
            "there are no viewers, so no relay is on a viewer's path (give some with --clients)"
                .to_owned()
        })
    } else {
        None
    };
    report.fewer_kills.clone_from(&nothing_to_kill);
    match &nothing_to_kill {
        Some(why) => writeln!(out, "kills: none: {why}")?,
        None => writeln!(
            out,
            "kills: up to {} relays on viewers' stream paths (never a server or a PoP; preferably one whose loss cuts no PoP off), one every 3 s",
            args.failures
        )?,
    }
    let servers_ids = adj.indices(&sim.ids_with_role(Role::Server));
    let pop_ids = adj.indices(&sim.pop_ids());
    for k in 0..args.failures {
        if nothing_to_kill.is_some() {
            break;
        }
        let active: Vec<String> = relays_on_viewer_paths(&sim).into_iter().collect();
        if active.is_empty() {
            let why = if k == 0 {
                "none: no relay is on a viewer's stream path (the viewers' PoPs take the stream straight from a server)".to_owned()
            } else {
                format!(
                    "stopped after {k} of {}: no running relay is left on a viewer's stream path",
                    args.failures
                )
            };
            writeln!(out, "kills: {why}")?;
            report.fewer_kills = Some(why);
            break;
        }
        // Prefer a relay whose loss leaves every PoP a path to a server: a failover to
        // measure, not a partition.
        let live = adj.live(&sim);
        let reach_now = adj.reach_servers(&live, &servers_ids, None);
        let safe: Vec<String> = active
            .iter()
            .filter(|r| !adj.cuts_off_a_pop(&live, &reach_now, r, &servers_ids, &pop_ids))
            .cloned()
            .collect();
        let pool = if safe.is_empty() { &active } else { &safe };
        let victim = pool[(rng() % pool.len() as u64) as usize].clone();
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
                sim.is_running(c)
                    && sim
                        .client(c)
                        .pop()
                        .is_some_and(|p| sim.stream_path(p, stream).contains(&victim))
            })
            .collect();
        let at = sim.elapsed();
        sim.kill(&victim);
        report.killed.push(victim.clone());
        // Nodes the kill cut off from every server cannot repair: counted apart.
        // (Reaching a server is `Sim::connected` to one, computed once for all.)
        let reach_after = adj.reach_servers(&adj.live(&sim), &servers_ids, None);
        let (mut pending, cut): (Vec<String>, Vec<String>) = affected_nodes
            .into_iter()
            .partition(|n| adj.contains(&reach_after, n));
        report.nodes_cut_off.extend(cut);
        while sim.elapsed() < at + Duration::from_secs(3) && !pending.is_empty() {
            sim.run_for(Duration::from_millis(10));
            pending.retain(|n| {
                let repaired = sim.try_node(n).is_some_and(|x| {
                    let st = x.status();
                    st.parent.is_some() && !st.path.contains(&victim)
                });
                if repaired {
                    tree_repair.push(sim.elapsed() - at);
                }
                !repaired
            });
        }
        sim.run_until(at + Duration::from_secs(3));
        for n in &pending {
            writeln!(out, "  {n} still has no route 3 s after {victim} died")?;
        }
        for c in affected_clients {
            // A viewer none of whose PoPs reaches a server any more cannot recover: it
            // is counted apart, not as a 3 s outage.
            let reachable = sim
                .pops_of(&c)
                .iter()
                .any(|p| adj.contains(&reach_after, p));
            if reachable {
                if sim.received(&c, stream) > 0 {
                    outages.push(sim.longest_gap(&c, stream, at, at + Duration::from_secs(3)));
                    hit.push((c, at));
                }
            } else {
                report.cut_off.insert(c);
            }
        }
    }
    if report.killed.is_empty() {
        writeln!(out, "killed: none")?;
    } else {
        writeln!(
            out,
            "killed ({}): {}",
            plural(report.killed.len(), "relay"),
            report.killed.join(" ")
        )?;
    }
    print_dist(out, "tree repair (nodes below the dead)", &mut tree_repair)?;
    print_dist(out, "viewer outage (affected viewers)", &mut outages)?;
    // Frames made in the last second may still be on their way: not counted.
    let settled = sim.elapsed().saturating_sub(Duration::from_secs(1));
    for (c, at) in &hit {
        let (intact, expected) =
            sim.frames_intact(c, stream, *at, (*at + Duration::from_secs(2)).min(settled));
        report.frames_lost.push(expected - intact);
    }
    if report.frames_lost.is_empty() {
        writeln!(
            out,
            "{:<34} none affected",
            "frames lost per kill (per viewer)"
        )?;
    } else {
        let mut v = report.frames_lost.clone();
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        writeln!(
            out,
            "{:<34} n={:<5} median={:>6} p99={:>6} max={:>6} (of the frames made in the 2 s after the kill)",
            "frames lost per kill (per viewer)",
            v.len(),
            at(0.5),
            at(0.99),
            v[v.len() - 1]
        )?;
    }
    for c in sim.client_ids() {
        let (intact, expected) = sim.frames_intact(&c, stream, Duration::ZERO, settled);
        if expected > 0 {
            report.media_viewers += 1;
        }
        report.frames.0 += intact;
        report.frames.1 += expected;
    }
    let m = sim.media();
    let st = sim.stats();
    writeln!(
        out,
        "media: {} of {} frames intact at {} viewers ({} %; a frame every {} ms of {} bytes in 2 datagrams; {} media datagrams, {} NACKs sent)",
        report.frames.0,
        report.frames.1,
        report.media_viewers,
        match report.frames.1 {
            0 => "-".to_owned(),
            e => format!("{:.1}", 100.0 * report.frames.0 as f64 / e as f64),
        },
        m.period.as_millis(),
        m.frame_len,
        st.media_sent,
        st.nacks_sent
    )?;
    if !report.nodes_cut_off.is_empty() || !report.cut_off.is_empty() {
        writeln!(
            out,
            "cut off by the kills (no path left to any server, not counted above): {}, {}",
            plural(report.nodes_cut_off.len(), "node"),
            plural(report.cut_off.len(), "viewer")
        )?;
    }
    let st = sim.stats();
    report.loop_violations = st.loop_violations;
    writeln!(
        out,
        "loop checks: {} (after every step, from the host that changed), violations: {}{}",
        st.loop_checks,
        st.loop_violations,
        sim.first_loop_violation()
            .map(|v| format!(" (first: {v})"))
            .unwrap_or_default()
    )?;
    report.final_violation = sim.check_loop_free().err();
    writeln!(
        out,
        "final whole-network check: {}",
        report.final_violation.as_deref().unwrap_or("loop free")
    )?;
    writeln!(
        out,
        "simulated {:.1} s in {:.1} s ({} steps, {} control datagrams)",
        sim.elapsed().as_secs_f64(),
        wall.elapsed().as_secs_f64(),
        st.steps,
        st.control_sent
    )?;
    Ok(report)
}

/// Watch the network for `secs` without changing it: parent changes per node per
/// minute and PoP switches per viewer per minute (mean and worst).
fn stability(sim: &mut Sim, secs: u64, out: &mut dyn Write) -> anyhow::Result<()> {
    let nodes = sim.node_ids();
    let viewers = sim.client_ids();
    let parents = |sim: &Sim| -> Vec<u64> {
        nodes
            .iter()
            .map(|n| sim.try_node(n).map_or(0, |x| x.stats().parent_changes))
            .collect()
    };
    let switches = |sim: &Sim| -> Vec<u64> {
        viewers
            .iter()
            .map(|c| {
                if sim.is_running(c) {
                    sim.client(c).pop_switches()
                } else {
                    0
                }
            })
            .collect()
    };
    let (p0, s0) = (parents(sim), switches(sim));
    sim.run_for(Duration::from_secs(secs));
    let minutes = secs as f64 / 60.0;
    let per_min = |before: Vec<u64>, after: Vec<u64>| -> (f64, f64) {
        let d: Vec<f64> = before
            .iter()
            .zip(after)
            .map(|(b, a)| a.saturating_sub(*b) as f64 / minutes)
            .collect();
        let mean = d.iter().sum::<f64>() / d.len().max(1) as f64;
        (mean, d.iter().copied().fold(0.0, f64::max))
    };
    let (pm, px) = per_min(p0, parents(sim));
    let (sm, sx) = per_min(s0, switches(sim));
    writeln!(
        out,
        "stability over {secs} s: parent changes per node per minute mean={pm:.2} max={px:.2}; PoP switches per viewer per minute mean={sm:.2} max={sx:.2}"
    )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `args` as the command does, never beside a timing-sensitive test (the runs
    /// keep both cores busy).
    fn run_to_text(args: &SimArgs) -> (anyhow::Result<SimReport>, String) {
        let _cpu = crate::emulate::ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        let r = simulate(args, &mut out);
        (r, String::from_utf8_lossy(&out).into_owned())
    }

    /// Every kill is a relay, the tree stayed loop free, the report is complete.
    fn check(what: &str, r: &SimReport, text: &str) {
        for k in &r.killed {
            assert_eq!(
                r.roles.get(k),
                Some(&Role::Relay),
                "{what}: killed {k}\n{text}"
            );
        }
        assert_eq!(r.loop_violations, 0, "{what}\n{text}");
        assert_eq!(r.final_violation, None, "{what}\n{text}");
        assert!(r.converged.is_some(), "{what}: did not converge\n{text}");
        assert!(text.contains("final whole-network check"), "{what}\n{text}");
    }

    // `--nodes 20 --seed 1` killed a PoP, then looked its path up and panicked.
    #[test]
    fn small_random_overlays_run_and_kill_only_relays() {
        for nodes in [2, 3, 5, 20] {
            for seed in 1..=3 {
                let args = SimArgs {
                    nodes,
                    seed,
                    ..SimArgs::default()
                };
                let (r, text) = run_to_text(&args);
                let what = format!("--nodes {nodes} --seed {seed}");
                let r = r.unwrap_or_else(|e| panic!("{what}: {e:#}\n{text}"));
                check(&what, &r, &text);
                let relays = r.roles.values().filter(|&&x| x == Role::Relay).count();
                if relays == 0 {
                    assert!(text.contains("too small for kills"), "{what}\n{text}");
                }
                if r.killed.len() < args.failures {
                    assert!(r.fewer_kills.is_some(), "{what}\n{text}");
                    assert!(
                        text.contains("kills: none: ") || text.contains("kills: stopped after"),
                        "{what}: fewer kills without a word\n{text}"
                    );
                }
                if (nodes, seed) == (20, 1) {
                    assert!(!r.killed.is_empty(), "{what}\n{text}");
                }
            }
        }
    }

    #[test]
    fn two_nodes_say_plainly_that_there_is_nothing_to_kill() {
        let args = SimArgs {
            nodes: 2,
            ..SimArgs::default()
        };
        let (r, text) = run_to_text(&args);
        let r = r.expect("two nodes run");
        assert!(r.killed.is_empty());
        assert!(
            text.contains("kills: none: the overlay has no relay (2 nodes: 1 server, 1 PoP); it is too small for kills"),
            "{text}"
        );
        assert!(text.contains("killed: none"), "{text}");
    }

    #[test]
    fn one_node_is_refused_with_a_clear_message() {
        let args = SimArgs {
            nodes: 1,
            ..SimArgs::default()
        };
        let (r, _) = run_to_text(&args);
        let e = r.expect_err("one node is refused");
        assert!(
            e.to_string().contains("--nodes must be at least 2"),
            "{e:#}"
        );
    }

    #[test]
    fn senseless_flags_are_refused_naming_the_flag() {
        // The defaults with one field changed.
        let with = |change: fn(&mut SimArgs)| {
            let mut a = SimArgs::default();
            change(&mut a);
            a
        };
        let cases: [(SimArgs, &str); 10] = [
            (
                with(|a| a.loss_pct = 150.0),
                "--loss-pct must be a percentage from 0 to 100, got 150",
            ),
            (
                with(|a| a.loss_pct = -5.0),
                "--loss-pct must be a percentage from 0 to 100, got -5",
            ),
            (
                with(|a| a.loss_pct = f64::NAN),
                "--loss-pct must be a percentage from 0 to 100, got NaN",
            ),
            (
                with(|a| a.jitter_ms = f64::INFINITY),
                "--jitter-ms must be from 0 to 60000 ms, got inf",
            ),
            (
                with(|a| a.jitter_ms = -3.0),
                "--jitter-ms must be from 0 to 60000 ms, got -3",
            ),
            (
                with(|a| a.frame_ms = 0),
                "--frame-ms must be from 1 to 60000 ms, got 0",
            ),
            (
                with(|a| a.silence_ms = 60_001),
                "--silence-ms must be from 0 (off) to 60000 ms, got 60001",
            ),
            (
                with(|a| a.stability_s = u64::MAX),
                "--stability-s must be at most 86400",
            ),
            (with(|a| a.degree = 1), "--degree must be at least 2"),
            (with(|a| a.nodes = 0), "--nodes must be at least 2"),
        ];
        for (args, said) in cases {
            let (r, text) = run_to_text(&args);
            let e = r.expect_err(said);
            assert!(e.to_string().contains(said), "{e:#}, not {said}");
            assert!(text.is_empty(), "{text}");
        }
        // At the edges, accepted.
        let edge = SimArgs {
            nodes: 3,
            degree: 2,
            loss_pct: 100.0,
            failures: 0,
            clients: Some(1),
            ..SimArgs::default()
        };
        assert!(check_args(&edge).is_ok());
    }

    /// The command line the issue gives: `--loss PCT` as well as `--loss-pct PCT`.
    #[test]
    fn loss_is_taken_by_either_name() {
        #[derive(clap::Parser)]
        struct Line {
            #[command(flatten)]
            sim: SimArgs,
        }
        for flag in ["--loss", "--loss-pct"] {
            let line = <Line as clap::Parser>::try_parse_from([
                "sim",
                "--nodes",
                "150",
                "--seed",
                "11",
                flag,
                "2.5",
                "--jitter-ms",
                "5",
                "--degree",
                "6",
            ])
            .unwrap_or_else(|e| panic!("{flag}: {e}"));
            let a = line.sim;
            assert_eq!(
                (a.nodes, a.seed, a.loss_pct, a.jitter_ms, a.degree),
                (150, 11, 2.5, 5.0, 6),
                "{flag}"
            );
        }
    }

    #[test]
    fn an_overlay_larger_than_the_memory_is_refused_before_it_is_built() {
        let gb = 1u64 << 30;
        assert!(check_memory(100_000, 50, Some(8 * gb)).is_ok());
        let e = check_memory(200_000_000, 50, Some(22 * gb)).expect_err("too big");
        let e = e.to_string();
        assert!(
            e.contains(
                "200000000 nodes (--nodes) and 50 viewers (--clients) need about 13107.2 GB"
            ) && e.contains("23.6 GB available"),
            "{e}"
        );
        assert!(check_memory(10, 5_000_000, Some(gb)).is_err());
        // Unknown memory: the run is tried.
        assert!(check_memory(usize::MAX, usize::MAX, None).is_ok());
        // The real check, through the flags: nothing is built.
        let args = SimArgs {
            nodes: usize::MAX / 2,
            ..SimArgs::default()
        };
        if available_memory().is_some() {
            let (r, text) = run_to_text(&args);
            assert!(r.is_err() && text.is_empty(), "{text}");
        }
    }

    #[test]
    fn more_threads_than_cores_are_not_started() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(threads(0), cores);
        assert_eq!(threads(1), 1);
        assert_eq!(threads(cores + 62), cores);
    }

    #[test]
    fn every_topology_file_runs_and_kills_its_relays_only() {
        let dir = crate::project_root().join("topologies");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("topologies/")
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        assert!(files.len() >= 3, "{files:?}");
        for file in files {
            let args = SimArgs {
                topology: Some(file.clone()),
                failures: 3,
                ..SimArgs::default()
            };
            let (r, text) = run_to_text(&args);
            let what = file.display().to_string();
            let r = r.unwrap_or_else(|e| panic!("{what}: {e:#}\n{text}"));
            check(&what, &r, &text);
            let t = Topology::load(&file).expect("loads");
            assert_eq!(r.viewers, t.clients().len(), "{what}");
            assert_eq!(
                r.roles.len(),
                t.nodes.iter().filter(|n| n.role.is_overlay()).count(),
                "{what}"
            );
            assert!(
                text.starts_with(&format!("topology {} (", t.name)),
                "{text}"
            );
        }
    }

    #[test]
    fn a_topology_with_two_servers_and_extra_viewers_loses_relays_not_servers() {
        let args = SimArgs {
            topology: Some(crate::project_root().join("topologies/two-servers.toml")),
            clients: Some(4),
            failures: 2,
            seed: 2,
            ..SimArgs::default()
        };
        let (r, text) = run_to_text(&args);
        let r = r.unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        check("two-servers", &r, &text);
        assert_eq!(r.viewers, 4);
        assert!(text.contains("(2 servers, 3 relays, 2 PoPs)"), "{text}");
        assert!(!r.killed.is_empty(), "{text}");
    }

    #[test]
    fn jitter_and_loss_flags_report_stability_rates() {
        let args = SimArgs {
            topology: Some(crate::project_root().join("topologies/seed.toml")),
            failures: 0,
            jitter_ms: 20.0,
            loss_pct: 1.0,
            stability_s: 60,
            ..SimArgs::default()
        };
        let (r, text) = run_to_text(&args);
        let r = r.unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        check("seed jitter", &r, &text);
        assert!(
            text.contains("every link: +40 ms jitter (±20 ms), +1 % loss"),
            "{text}"
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("stability over 60 s: parent changes per node per minute"))
            .unwrap_or_else(|| panic!("no stability line\n{text}"));
        assert!(
            line.contains("PoP switches per viewer per minute"),
            "{text}"
        );
    }

    #[test]
    fn a_viewer_whose_pop_is_cut_off_is_counted_apart_not_as_an_outage() {
        // s1 - r1 - r2 - p1: killing either relay leaves p1 no path to the server.
        let args = SimArgs {
            topology: Some(crate::project_root().join("topologies/line.toml")),
            failures: 5,
            ..SimArgs::default()
        };
        let (r, text) = run_to_text(&args);
        let r = r.unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        check("line", &r, &text);
        assert_eq!(
            r.killed.len(),
            1,
            "the second relay is off every path\n{text}"
        );
        assert_eq!(r.cut_off.len(), r.viewers, "{text}");
        assert!(
            text.contains("viewer outage (affected viewers)   none affected"),
            "{text}"
        );
        assert!(
            text.contains("cut off by the kills (no path left to any server, not counted above): 2 nodes, 1 viewer"),
            "{text}"
        );
        assert!(
            text.contains("tree repair (nodes below the dead) none affected"),
            "{text}"
        );
        assert!(text.contains("kills: stopped after 1 of 5"), "{text}");
    }

    #[test]
    fn a_relay_whose_loss_cuts_a_pop_off_is_recognised() {
        let load = |name: &str| {
            let t = Topology::load(&crate::project_root().join("topologies").join(name))
                .expect("loads");
            let mut sim = Sim::from_topology(&t, 1);
            sim.start();
            sim
        };
        let s1 = ["s1".to_owned()];
        let line = load("line.toml");
        let adj = adjacency(&line);
        assert!(would_cut_off_a_pop(&line, &adj, "r1", &s1));
        assert!(would_cut_off_a_pop(&line, &adj, "r2", &s1));
        let mut diamond = load("diamond.toml");
        let adj = adjacency(&diamond);
        assert!(!would_cut_off_a_pop(&diamond, &adj, "ra", &s1));
        assert!(!would_cut_off_a_pop(&diamond, &adj, "rb", &s1));
        diamond.kill("ra");
        assert!(would_cut_off_a_pop(&diamond, &adj, "rb", &s1));
    }

    #[test]
    fn the_same_seed_gives_the_same_output_media_included() {
        let args = SimArgs {
            nodes: 60,
            seed: 4,
            failures: 3,
            clients: Some(8),
            loss_pct: 1.0,
            jitter_ms: 2.0,
            ..SimArgs::default()
        };
        // Everything but the wall time of the last line.
        let run = |threads| {
            let args = SimArgs {
                threads,
                ..args.clone()
            };
            let (r, text) = run_to_text(&args);
            let r = r.unwrap_or_else(|e| panic!("{e:#}\n{text}"));
            let text: Vec<String> = text
                .lines()
                .map(|l| match l.find(" s in ") {
                    Some(k) if l.starts_with("simulated ") => l[..k].to_owned(),
                    _ => l.to_owned(),
                })
                .collect();
            (r, text.join("\n"))
        };
        let (r, a) = run(1);
        // The same again, split in two and in three parts each stepped by its thread.
        let (_, b) = run(2);
        assert_eq!(a, b);
        let (_, c) = run(3);
        assert_eq!(a, c);
        check("--nodes 60 --seed 4", &r, &a);
        let line = a
            .lines()
            .find(|l| l.starts_with("media: "))
            .unwrap_or_else(|| panic!("no media line\n{a}"));
        assert!(line.contains(" frames intact at 8 viewers"), "{a}");
        let (intact, expected) = r.frames;
        assert!(expected > 8 * 500, "{a}");
        // 1 % loss on every link: NACKs bring back nearly everything.
        assert!(intact * 100 >= expected * 95, "{a}");
        assert!(a.contains("frames lost per kill (per viewer)"), "{a}");
    }

    #[test]
    fn without_loss_or_kills_every_frame_is_intact() {
        let args = SimArgs {
            nodes: 40,
            seed: 2,
            failures: 0,
            clients: Some(6),
            ..SimArgs::default()
        };
        let (r, text) = run_to_text(&args);
        let r = r.unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        assert_eq!(r.media_viewers, 6, "{text}");
        assert!(r.frames.1 > 6 * 200, "{text}");
        assert_eq!(r.frames.0, r.frames.1, "{text}");
    }

    #[test]
    fn a_missing_topology_file_is_named() {
        let args = SimArgs {
            topology: Some(PathBuf::from("topologies/no-such-file.toml")),
            ..SimArgs::default()
        };
        let (r, _) = run_to_text(&args);
        let e = format!("{:#}", r.expect_err("missing file"));
        assert!(e.contains("no-such-file.toml"), "{e}");
    }
}
