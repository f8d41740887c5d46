//! `cargo xtask emulate`: a topology in Linux network namespaces.
//!
//! One namespace per node; one emulated link per topology link: a TAP device in each
//! end's namespace, joined by a user-space forwarder ([`link`]) that applies delay,
//! jitter, loss and rate per direction (these kernels have no `netem`). IP forwarding and
//! static routes shortest by delay ([`routes`]) let clients reach PoPs through routers
//! and overlay neighbours reach each other across routers. The namespaces are joined
//! only to each other: no device, route or socket reaches the host's network.
//!
//! The programs run inside their namespaces (the bootstrapper on its host); a status
//! poller per overlay node records the tree; the scenario's events run on a timeline;
//! at the end a [`report::Report`] says what each client received.
//!
//! Everything the run creates is owned by an [`Emulation`], whose `Drop` stops every
//! process, stops the links (closing the TAP devices) and deletes the namespaces, also
//! on an error, a panic or Ctrl-C. Namespaces of a crashed run are removed by the next
//! run ([`netns::cleanup_stale`]).

// The link forwarder polls TAP file descriptors and builds a socketpair: libc calls.
#[allow(unsafe_code)]
pub(crate) mod link;
// Namespaces and TAP devices (`setns`, `ioctl(TUNSETIFF)`) have no safe wrapper.
#[allow(unsafe_code)]
pub(crate) mod netns;
pub(crate) mod plot;
pub(crate) mod random;
pub(crate) mod report;
pub(crate) mod routes;
pub(crate) mod scenario;
pub(crate) mod sweep;
#[cfg(test)]
// The tests skip unless root: `geteuid`.
#[allow(unsafe_code)]
mod tests;

/// Timing-sensitive tests (emulations, link measurements) run one at a time: they share
/// two cores with everything else. The simulator's tests, which keep both cores busy
/// for seconds, take it too: in a failed CI run an emulation ran beside them and both of
/// its viewers ended over a second behind the source.
#[cfg(test)]
pub(crate) static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ott_overlay::{AddressPlan, Role, Topology};

use self::link::{LinkHandle, Params};
use self::report::{ClientReport, EventRecord, LinkReport, ParentChange, Report};
use self::scenario::{Action, Scenario};

/// Bootstrapper port inside the emulation.
const BOOTSTRAP_PORT: u16 = 7070;
/// `--status` port of every program inside the emulation.
const STATUS_PORT: u16 = 7080;
/// How often the tree is sampled.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How long the tree must stay unchanged before the scenario starts.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(clap::Args)]
pub(crate) struct EmulateArgs {
    /// Topology to run.
    #[arg(long, default_value = "topologies/seed.toml")]
    topology: PathBuf,
    /// Scenario (clients and timed events); without it, two clients watch for --duration.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// How long the clients watch, in seconds (overrides the scenario's duration_s;
    /// 20 with --random and --random-sweep).
    #[arg(long)]
    duration: Option<f64>,
    /// Also write the report as JSON to this file (--random-sweep: its lines).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Directory of clips.
    #[arg(long, default_value = "videos")]
    videos: PathBuf,
    /// Build and run the release programs.
    #[arg(long)]
    release: bool,
    /// Turn loss recovery off: every ott-node and ott-client gets `--no-nack` (the
    /// server always answers NACKs, but no one sends any).
    #[arg(long, conflicts_with = "compare")]
    no_recovery: bool,
    /// Run the scenario twice, with and without loss recovery, and print both reports
    /// and a comparison (`--report` then names the first; the second gets `.no-recovery`).
    #[arg(long, conflicts_with_all = ["random", "random_sweep"])]
    compare: bool,
    /// Generate a topology from this seed (written to target/emulate/random-SEED-nN.toml)
    /// and run it with a viewer on every client node.
    #[arg(long, value_name = "SEED", conflicts_with_all = ["topology", "scenario", "random_sweep"])]
    random: Option<u64>,
    /// Run K generated topologies (seeds --first-seed, --first-seed + 1, ...) and print
    /// one line per seed.
    #[arg(long, value_name = "K", conflicts_with_all = ["topology", "scenario"])]
    random_sweep: Option<u64>,
    /// First seed of --random-sweep.
    #[arg(long, default_value_t = 1, requires = "random_sweep")]
    first_seed: u64,
    /// Nodes of a generated topology (routers and clients included).
    #[arg(long, default_value_t = random::DEFAULT_NODES, value_parser = random::parse_nodes)]
    nodes: usize,
    /// Generated topologies: every PoP's first link faces an access router (in sparse
    /// overlays PoPs have only that link).
    #[arg(long)]
    clients_first: bool,
    /// Random loss in percent on every link, both directions, from the start (the
    /// viewers start 0.5 s later).
    #[arg(long, value_name = "PCT")]
    loss: Option<f64>,
    /// Kill a relay on an active path halfway through the run: the one with the most
    /// PoPs below it, preferring those whose loss cuts no PoP off from the servers.
    #[arg(long)]
    kill_relay: bool,
    /// Paths every viewer receives its stream over (`ott-client --paths`): 2 joins a
    /// second PoP whose tree path is disjoint from the first's where there is one.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=2))]
    paths: u8,
}

/// What one run needs.
#[derive(Debug, Clone)]
pub(crate) struct RunOptions {
    pub(crate) topology: PathBuf,
    pub(crate) scenario: Option<PathBuf>,
    pub(crate) duration: Option<f64>,
    pub(crate) videos: PathBuf,
    pub(crate) bin_dir: PathBuf,
    /// Logs, client outputs and the report go here.
    pub(crate) work_dir: PathBuf,
    /// Set to stop the run early (Ctrl-C).
    pub(crate) stop: Arc<AtomicBool>,
    /// Loss recovery on (NACKs); off passes `--no-nack` to every node and client.
    pub(crate) recovery: bool,
    /// `--paths` of every client.
    pub(crate) paths: u8,
}

pub(crate) fn run(args: EmulateArgs) -> anyhow::Result<()> {
    if let Some(loss) = args.loss {
        if !(loss.is_finite() && (0.0..=100.0).contains(&loss)) {
            bail!("--loss {loss}: a percentage from 0 to 100");
        }
    }
    if let Some(d) = args.duration {
        // A day at most, so that the run's end is a time the clock can hold.
        if !(d.is_finite() && d > 0.0 && d <= 86_400.0) {
            bail!("--duration {d}: a positive number of seconds, at most 86400 (a day)");
        }
    }
    if args.random_sweep == Some(0) {
        bail!("--random-sweep 0: sweep at least one seed");
    }
    check_root()?;
    let root = crate::project_root();
    eprintln!("building the programs…");
    let bin_dir = crate::build_binaries(args.release)?;
    let stop = Arc::new(AtomicBool::new(false));
    let signals = ott_apps::signals::shutdown_channel();
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        if signals.recv().is_ok() {
            eprintln!("interrupted: cleaning up…");
            stop2.store(true, Ordering::SeqCst);
        }
    });
    let opts = RunOptions {
        topology: root.join(&args.topology),
        scenario: args.scenario.map(|s| root.join(s)),
        duration: args.duration,
        videos: root.join(&args.videos),
        bin_dir,
        work_dir: root.join("target").join("emulate"),
        stop,
        recovery: !args.no_recovery,
        paths: args.paths,
    };
    let faults = sweep::Faults {
        loss_pct: args.loss,
        kill_relay: args.kill_relay,
    };
    let shape = random::Shape {
        clients_first: args.clients_first,
    };
    if let Some(k) = args.random_sweep {
        return sweep::sweep(
            &opts,
            args.first_seed,
            k,
            args.nodes,
            shape,
            faults,
            args.report.as_deref(),
        );
    }
    let report = match args.random {
        Some(seed) => {
            let (report, line) = sweep::run_one(&opts, seed, args.nodes, shape, faults)?;
            println!("{}", report.text());
            println!("{}\n{}", sweep::Line::header(), line.text());
            report
        }
        None => {
            let report = run_scenario_with(&opts, |_, _, s| faults.add_to(s))?;
            println!("{}", report.text());
            report
        }
    };
    if let Some(path) = &args.report {
        write_report(&report, path)?;
    }
    if args.compare {
        let without = run_scenario_with(
            &RunOptions {
                recovery: false,
                ..opts
            },
            |_, _, s| faults.add_to(s),
        )?;
        println!("{}", without.text());
        if let Some(path) = &args.report {
            write_report(&without, &path.with_extension("no-recovery.json"))?;
        }
        println!("{}", report::compare(&report, &without));
    }
    Ok(())
}

fn write_report(report: &Report, path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, report.json()?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// Fails unless we can create namespaces.
#[allow(unsafe_code)] // geteuid: std has no way to ask for the effective uid.
pub(crate) fn check_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("emulation creates network namespaces and TAP devices: run it as root (sudo -E cargo xtask emulate ...)");
    }
    Ok(())
}

/// Runs one scenario from start to report; everything is cleaned up when it returns.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn run_scenario(opts: &RunOptions) -> anyhow::Result<Report> {
    run_scenario_with(opts, |_, _, _| {})
}

/// [`run_scenario`], with `adjust` changing the scenario (after `--duration` is applied)
/// before it runs; it gets the topology and the stream names.
pub(crate) fn run_scenario_with(
    opts: &RunOptions,
    adjust: impl FnOnce(&Topology, &[String], &mut Scenario),
) -> anyhow::Result<Report> {
    let removed = netns::cleanup_stale();
    if !removed.is_empty() {
        eprintln!("removed {} namespaces left by a crashed run", removed.len());
    }
    let topology = Topology::load(&opts.topology)?;
    let clips = ott_media::load_dir(&opts.videos)?;
    let streams: Vec<String> = clips.iter().map(|c| c.name.clone()).collect();
    let mut scenario = match &opts.scenario {
        Some(p) => Scenario::load(p, &topology)?,
        None => Scenario::default_for(&topology, &streams),
    };
    if let Some(d) = opts.duration {
        scenario.duration_s = d;
    }
    adjust(&topology, &streams, &mut scenario);
    let mut emu = Emulation::new(topology, opts)?;
    eprintln!(
        "run {}: {} namespaces, {} links",
        emu.run,
        emu.ns.len(),
        emu.links.len()
    );
    emu.start_programs()?;
    emu.wait_converged(Duration::from_secs(60))?;
    let t0 = Instant::now();
    eprintln!(
        "tree formed; scenario {} for {} s, loss recovery {}",
        scenario.name,
        scenario.duration_s,
        if opts.recovery { "on" } else { "off" }
    );
    emu.play(&scenario, t0)?;
    let changes = emu.parent_changes(t0);
    let initial = emu.parents_at(t0);
    let clients = emu.finish_clients(&clips)?;
    let report = Report {
        topology: emu.topology.name.clone(),
        scenario: scenario.name.clone(),
        description: scenario.description.clone(),
        duration_s: scenario.duration_s,
        recovery: opts.recovery,
        run: emu.run.clone(),
        work_dir: emu.work_dir.display().to_string(),
        initial_parents: initial,
        clients,
        parent_changes: changes,
        events: std::mem::take(&mut emu.events),
        links: emu.link_reports(),
        pids: emu.started.clone(),
    };
    std::fs::write(emu.work_dir.join("report.json"), report.json()?)?;
    emu.write_plots(&scenario, &report, t0);
    drop(emu);
    Ok(report)
}

struct Proc {
    child: Child,
}

impl Proc {
    #[allow(unsafe_code)] // kill(2) with SIGTERM: std only sends SIGKILL.
    fn terminate(&mut self, grace: Duration) {
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// One client process of the run.
struct ClientProc {
    node: String,
    stream: String,
    proc: Option<Proc>,
    output: PathBuf,
    log: PathBuf,
    stdout: PathBuf,
    /// Streams switched to, in order.
    switches: Vec<String>,
    /// When it was started and stopped (wall clock, as in its log).
    times: report::ClientTimes,
}

impl ClientProc {
    /// Stops it (SIGTERM: it prints its summary) and notes when.
    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            self.times.stopped = Some(std::time::SystemTime::now());
            p.terminate(Duration::from_secs(5));
        }
    }
}

/// Parent samples of one node: `(when, parent)` at each change.
type Samples = Arc<Mutex<Vec<(Instant, Option<String>)>>>;

/// A running emulation; dropping it removes everything it made.
pub(crate) struct Emulation {
    pub(crate) run: String,
    pub(crate) topology: Topology,
    /// Node id → namespace name, for every namespace created so far.
    ns: BTreeMap<String, String>,
    links: Vec<LinkHandle>,
    /// Which links are up (routes avoid the others).
    up: Vec<bool>,
    procs: BTreeMap<String, Proc>,
    clients: Vec<ClientProc>,
    pollers: Vec<std::thread::JoinHandle<()>>,
    samples: BTreeMap<String, Samples>,
    /// Each client's `/status` readings, for the plots.
    viewer_samples: Vec<(String, plot::ViewerSamples)>,
    /// Each overlay node's latest count of stream children (from its `/status`).
    carrying: BTreeMap<String, Arc<AtomicUsize>>,
    /// The scenario's events as they ran.
    events: Vec<EventRecord>,
    stop_pollers: Arc<AtomicBool>,
    work_dir: PathBuf,
    bin_dir: PathBuf,
    videos: PathBuf,
    topo_file: PathBuf,
    bootstrap: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Every process started, for the report's leftover check.
    started: Vec<u32>,
    /// Loss recovery on; off passes `--no-nack` to nodes and clients.
    recovery: bool,
    /// `--paths` of every client.
    paths: u8,
    /// The overlay key of this run (given to every overlay program; removed on drop).
    key_file: PathBuf,
}

impl Emulation {
    /// Creates the namespaces, links, addresses and routes.
    fn new(topology: Topology, opts: &RunOptions) -> anyhow::Result<Self> {
        let run = netns::new_run_id();
        let work_dir = opts.work_dir.join(&run);
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("cannot create {}", work_dir.display()))?;
        let key_file = work_dir.join("overlay.key");
        ott_apps::keying::write_key_file(&key_file)?;
        let topo_file = work_dir.join("topology.toml");
        std::fs::copy(&opts.topology, &topo_file)
            .with_context(|| format!("cannot copy {}", opts.topology.display()))?;
        let boot_ip = topology
            .node_ip(&topology.bootstrapper, AddressPlan::Links)
            .with_context(|| format!("bootstrapper {} has no link", topology.bootstrapper))?;
        let up = vec![true; topology.links.len()];
        let mut emu = Self {
            run,
            topology,
            ns: BTreeMap::new(),
            links: Vec::new(),
            up,
            procs: BTreeMap::new(),
            clients: Vec::new(),
            pollers: Vec::new(),
            samples: BTreeMap::new(),
            viewer_samples: Vec::new(),
            carrying: BTreeMap::new(),
            events: Vec::new(),
            stop_pollers: Arc::new(AtomicBool::new(false)),
            work_dir,
            bin_dir: opts.bin_dir.clone(),
            videos: opts.videos.clone(),
            topo_file,
            bootstrap: SocketAddr::new(boot_ip.into(), BOOTSTRAP_PORT),
            stop: opts.stop.clone(),
            started: Vec::new(),
            recovery: opts.recovery,
            paths: opts.paths,
            key_file,
        };
        emu.build_network()?;
        Ok(emu)
    }

    fn build_network(&mut self) -> anyhow::Result<()> {
        let t = &self.topology;
        // Namespaces, with loopback up and forwarding on.
        for n in &t.nodes {
            let ns = netns::ns_name(&self.run, &n.id);
            netns::ip(&["netns", "add", &ns])?;
            self.ns.insert(n.id.clone(), ns.clone());
            netns::in_ns(&ns, || {
                for (file, value) in [
                    ("/proc/sys/net/ipv4/ip_forward", "1"),
                    ("/proc/sys/net/ipv4/conf/all/rp_filter", "0"),
                    ("/proc/sys/net/ipv4/conf/default/rp_filter", "0"),
                ] {
                    std::fs::write(file, value).with_context(|| format!("cannot set {file}"))?;
                }
                Ok(())
            })?;
        }
        // Interfaces eth0, eth1, ... in each node's link order (as in the CORE export).
        let mut if_name: HashMap<(usize, usize), String> = HashMap::new();
        let mut config: BTreeMap<String, String> = BTreeMap::new();
        for n in &t.nodes {
            let cmds = config.entry(n.id.clone()).or_default();
            cmds.push_str("link set lo up\n");
            for (k, (li, ip)) in t.link_addresses(&n.id).into_iter().enumerate() {
                let end = usize::from(t.links[li].ends[0] != n.id);
                let name = format!("eth{k}");
                cmds.push_str(&format!(
                    "addr add {ip}/24 dev {name}\nlink set {name} up\n"
                ));
                if_name.insert((li, end), name);
            }
        }
        for (li, l) in t.links.iter().enumerate() {
            let mut files = Vec::new();
            for end in 0..2 {
                let ns = self.ns[&l.ends[end]].clone();
                let name = if_name
                    .get(&(li, end))
                    .cloned()
                    .with_context(|| format!("link {li} has no interface"))?;
                files.push(netns::in_ns(&ns, move || netns::open_tap(&name))?);
            }
            let (b, a) = (files.pop(), files.pop());
            let (Some(a), Some(b)) = (a, b) else {
                bail!("link {li}: TAP devices missing");
            };
            self.links.push(LinkHandle::start(
                &format!("l{li}"),
                a,
                b,
                Params::of(l),
                li as u64 + 1,
            )?);
        }
        let routes = routes::compute(t, |_| true);
        for n in &t.nodes {
            let mut cmds = config.remove(&n.id).unwrap_or_default();
            for r in routes.get(&n.id).into_iter().flatten() {
                cmds.push_str(&format!("route add {}/24 via {}\n", r.subnet, r.via));
            }
            netns::ip_batch(&self.ns[&n.id], &cmds)?;
        }
        Ok(())
    }

    /// Recompute the routes around links that are down and install them.
    fn reroute(&self) -> anyhow::Result<()> {
        let routes = routes::compute(&self.topology, |k| self.up.get(k).copied().unwrap_or(false));
        for n in &self.topology.nodes {
            let mut cmds = String::from("route flush proto boot\nroute flush proto static\n");
            for r in routes.get(&n.id).into_iter().flatten() {
                cmds.push_str(&format!(
                    "route add {}/24 via {} proto static\n",
                    r.subnet, r.via
                ));
            }
            netns::ip_batch(&self.ns[&n.id], &cmds)?;
        }
        Ok(())
    }

    fn command(&self, node: &str, bin: &str, log: &Path) -> anyhow::Result<Command> {
        let ns = self
            .ns
            .get(node)
            .with_context(|| format!("no namespace for {node}"))?;
        let f = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(self.bin_dir.join(bin))
            .env(
                "RUST_LOG",
                std::env::var("OTT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f);
        Ok(c)
    }

    /// Starts the bootstrapper and every overlay program, and a status poller per node.
    fn start_programs(&mut self) -> anyhow::Result<()> {
        let boot_log = self.work_dir.join("bootstrap.log");
        let mut c = self.command(
            &self.topology.bootstrapper.clone(),
            "ott-bootstrap",
            &boot_log,
        )?;
        c.arg("--topology").arg(&self.topo_file).args([
            "--listen",
            &format!("0.0.0.0:{BOOTSTRAP_PORT}"),
            "--addresses",
            "links",
        ]);
        c.arg("--key-file").arg(&self.key_file);
        let child = c.spawn().context("cannot start ott-bootstrap")?;
        self.started.push(child.id());
        self.procs.insert("bootstrap".into(), Proc { child });
        let overlay: Vec<String> = self
            .topology
            .nodes
            .iter()
            .filter(|n| n.role.is_overlay())
            .map(|n| n.id.clone())
            .collect();
        for id in &overlay {
            self.start_node(id)?;
        }
        for id in overlay {
            self.spawn_poller(&id)?;
        }
        Ok(())
    }

    fn start_node(&mut self, id: &str) -> anyhow::Result<()> {
        let role = self
            .topology
            .node(id)
            .map(|n| n.role)
            .context("unknown node")?;
        let log = self.work_dir.join(format!("{id}.log"));
        // Append, so a restarted node's log follows the first one.
        let mut c = if role == Role::Server {
            let mut c = self.command(id, "ott-server", &log)?;
            c.arg("--videos").arg(&self.videos);
            c
        } else {
            self.command(id, "ott-node", &log)?
        };
        if let Ok(f) = std::fs::OpenOptions::new().append(true).open(&log) {
            c.stdout(f.try_clone()?).stderr(f);
        }
        c.args(["--id", id, "--bootstrap", &self.bootstrap.to_string()])
            .args(["--status", &format!("0.0.0.0:{STATUS_PORT}")])
            .arg("--key-file")
            .arg(&self.key_file);
        if !self.recovery && role != Role::Server {
            c.arg("--no-nack");
        }
        let child = c.spawn().with_context(|| format!("cannot start {id}"))?;
        self.started.push(child.id());
        self.procs.insert(id.to_string(), Proc { child });
        Ok(())
    }

    fn spawn_poller(&mut self, id: &str) -> anyhow::Result<()> {
        let samples: Samples = Arc::new(Mutex::new(Vec::new()));
        self.samples.insert(id.to_string(), samples.clone());
        let carrying = Arc::new(AtomicUsize::new(0));
        self.carrying.insert(id.to_string(), carrying.clone());
        let stop = self.stop_pollers.clone();
        let path = format!("/run/netns/{}", self.ns[id]);
        let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), STATUS_PORT);
        let handle = std::thread::Builder::new()
            .name(format!("poll-{id}"))
            .spawn(move || {
                if netns::enter(&path).is_err() {
                    return;
                }
                let mut last: Option<Option<String>> = None;
                while !stop.load(Ordering::SeqCst) {
                    let at = Instant::now();
                    if let Ok((parent, children)) = poll_status(addr) {
                        carrying.store(children, Ordering::Relaxed);
                        if last.as_ref() != Some(&parent) {
                            if let Ok(mut s) = samples.lock() {
                                s.push((at, parent.clone()));
                            }
                            last = Some(parent);
                        }
                    }
                    std::thread::sleep(POLL_EVERY.saturating_sub(at.elapsed()));
                }
            })?;
        self.pollers.push(handle);
        Ok(())
    }

    /// The latest known parent of every overlay node.
    fn parents(&self) -> BTreeMap<String, Option<String>> {
        self.samples
            .iter()
            .map(|(id, s)| {
                let p = s
                    .lock()
                    .ok()
                    .and_then(|s| s.last().and_then(|x| x.1.clone()));
                (id.clone(), p)
            })
            .collect()
    }

    /// Waits until every relay and PoP has a parent and the tree has not changed for
    /// [`SETTLE`].
    fn wait_converged(&self, wait: Duration) -> anyhow::Result<()> {
        let servers: Vec<String> = self
            .topology
            .servers()
            .iter()
            .map(|n| n.id.clone())
            .collect();
        let deadline = Instant::now() + wait;
        let mut stable_since: Option<(Instant, BTreeMap<String, Option<String>>)> = None;
        loop {
            let parents = self.parents();
            let missing: Vec<&String> = parents
                .iter()
                .filter(|(id, p)| p.is_none() && !servers.contains(id))
                .map(|(id, _)| id)
                .collect();
            if missing.is_empty() {
                match &stable_since {
                    Some((since, tree)) if *tree == parents => {
                        if since.elapsed() >= SETTLE {
                            return Ok(());
                        }
                    }
                    _ => stable_since = Some((Instant::now(), parents.clone())),
                }
            } else {
                stable_since = None;
            }
            if self.stop.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            if Instant::now() >= deadline {
                bail!(
                    "the tree did not settle within {} s (no parent at {:?}; logs in {})",
                    wait.as_secs(),
                    missing,
                    self.work_dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Each node's parent at `t0`.
    fn parents_at(&self, t0: Instant) -> BTreeMap<String, Option<String>> {
        self.samples
            .iter()
            .map(|(id, s)| {
                let p = s.lock().ok().and_then(|s| {
                    s.iter()
                        .rev()
                        .find(|(at, _)| *at <= t0)
                        .and_then(|x| x.1.clone())
                });
                (id.clone(), p)
            })
            .collect()
    }

    /// Parent changes since `t0` (ms from `t0`), in time order.
    fn parent_changes(&self, t0: Instant) -> Vec<ParentChange> {
        let mut out = Vec::new();
        for (id, s) in &self.samples {
            let Ok(s) = s.lock() else { continue };
            let mut prev: Option<String> = None;
            for (at, parent) in s.iter() {
                if *at >= t0 {
                    out.push(ParentChange {
                        t_ms: at.duration_since(t0).as_millis() as u64,
                        node: id.clone(),
                        from: prev.clone(),
                        to: parent.clone(),
                    });
                }
                prev = parent.clone();
            }
        }
        out.sort_by(|a, b| a.t_ms.cmp(&b.t_ms).then(a.node.cmp(&b.node)));
        out
    }

    fn start_client(&mut self, node: &str, stream: &str) -> anyhow::Result<()> {
        if self
            .clients
            .iter()
            .any(|c| c.node == node && c.proc.is_some())
        {
            bail!("client {node} is already running");
        }
        let n = self.clients.iter().filter(|c| c.node == node).count();
        let name = if n == 0 {
            node.to_string()
        } else {
            format!("{node}.{n}")
        };
        let output = self.work_dir.join(format!("{name}.mjpeg"));
        let log = self.work_dir.join(format!("{name}.log"));
        let stdout = self.work_dir.join(format!("{name}.stdout"));
        let mut c = self.command(node, "ott-client", &log)?;
        c.args([
            "--bootstrap",
            &self.bootstrap.to_string(),
            "--id",
            node,
            "--stream",
            stream,
        ])
        .arg("--output")
        .arg(&output)
        .args(["--status", &format!("0.0.0.0:{}", plot::VIEWER_STATUS_PORT)])
        .args((!self.recovery).then_some("--no-nack"))
        .args(["--paths", &self.paths.to_string()])
        .stdin(Stdio::piped())
        .stdout(File::create(&stdout)?);
        let child = c
            .spawn()
            .with_context(|| format!("cannot start client {node}"))?;
        self.started.push(child.id());
        let ns_path = format!("/run/netns/{}", self.ns[node]);
        let (poller, samples) =
            plot::spawn_viewer_poller(&name, ns_path, self.stop_pollers.clone())?;
        self.pollers.push(poller);
        self.viewer_samples.push((name.clone(), samples));
        self.clients.push(ClientProc {
            node: node.to_string(),
            stream: stream.to_string(),
            proc: Some(Proc { child }),
            output,
            log,
            stdout,
            switches: Vec::new(),
            times: report::ClientTimes {
                started: std::time::SystemTime::now(),
                stopped: None,
            },
        });
        Ok(())
    }

    fn running_client(&mut self, node: &str) -> anyhow::Result<&mut ClientProc> {
        self.clients
            .iter_mut()
            .find(|c| c.node == node && c.proc.is_some())
            .with_context(|| format!("client {node} is not running"))
    }

    /// Does what `action` says; returns what was chosen when the action chooses (the
    /// relay a `kill_active_relay` killed).
    fn apply(&mut self, action: &Action) -> anyhow::Result<Option<String>> {
        match action {
            Action::Kill { node } => self.kill(node)?,
            Action::KillActiveRelay => {
                let carrying: BTreeMap<String, usize> = self
                    .carrying
                    .iter()
                    .map(|(id, c)| (id.clone(), c.load(Ordering::Relaxed)))
                    .collect();
                let parents = self.parents();
                let procs = &self.procs;
                let picked =
                    scenario::pick_active_relay(&self.topology, &parents, &carrying, |n| {
                        procs.contains_key(n)
                    });
                return Ok(Some(match picked {
                    Some(relay) => {
                        self.kill(&relay)?;
                        format!("killed {relay}")
                    }
                    None => {
                        let busy: Vec<String> = carrying
                            .iter()
                            .filter(|(id, &c)| {
                                c > 0 && self.topology.node(id).map(|n| n.role) == Some(Role::Relay)
                            })
                            .map(|(id, c)| format!("{id} ({c})"))
                            .collect();
                        format!(
                            "no relay on an active path whose loss leaves a PoP a path to a server (relays with stream children: {}): none killed",
                            if busy.is_empty() { "none".to_string() } else { busy.join(", ") }
                        )
                    }
                }));
            }
            Action::Restart { node } => {
                if self.procs.contains_key(node) {
                    bail!("{node} is still running");
                }
                self.start_node(node)?;
            }
            Action::Link { ends, .. } => {
                if let Some(change) = action.link_change() {
                    self.link(ends)?.set_both(|p| apply_change(&change, p));
                }
            }
            Action::AllLinks { .. } => {
                if let Some(change) = action.link_change() {
                    for l in &self.links {
                        l.set_both(|p| apply_change(&change, p));
                    }
                }
            }
            Action::LinkDown { ends } | Action::LinkUp { ends } => {
                let up = matches!(action, Action::LinkUp { .. });
                let (k, _) = self
                    .topology
                    .link_between(&ends[0], &ends[1])
                    .context("no such link")?;
                self.link(ends)?.set_both(|p| p.up = up);
                if let Some(u) = self.up.get_mut(k) {
                    *u = up;
                }
                self.reroute()?;
            }
            Action::ClientStart { client, stream } => self.start_client(client, stream)?,
            Action::ClientStop { client } => self.running_client(client)?.stop(),
            Action::Switch { client, stream } => {
                use std::io::Write;
                let c = self.running_client(client)?;
                c.switches.push(stream.clone());
                let stdin = c
                    .proc
                    .as_mut()
                    .and_then(|p| p.child.stdin.as_mut())
                    .context("client has no standard input")?;
                writeln!(stdin, "{stream}")?;
                stdin.flush()?;
            }
        }
        Ok(None)
    }

    /// SIGKILL a node's program.
    fn kill(&mut self, node: &str) -> anyhow::Result<()> {
        let mut p = self
            .procs
            .remove(node)
            .with_context(|| format!("{node} is not running"))?;
        p.child.kill()?;
        p.child.wait()?;
        Ok(())
    }

    fn link_reports(&self) -> Vec<LinkReport> {
        use std::sync::atomic::AtomicU64;
        let get = |l: &LinkHandle, f: fn(&link::DirStats) -> &AtomicU64| {
            [0, 1].map(|d| l.stats(d).map_or(0, |s| f(s).load(Ordering::Relaxed)))
        };
        self.topology
            .links
            .iter()
            .zip(&self.links)
            .map(|(t, l)| LinkReport {
                ends: t.ends.clone(),
                delivered: get(l, |s| &s.delivered),
                lost: get(l, |s| &s.lost),
                down: get(l, |s| &s.down),
                overflow: get(l, |s| &s.overflow),
            })
            .collect()
    }

    fn link(&self, ends: &[String; 2]) -> anyhow::Result<&LinkHandle> {
        let (k, _) = self
            .topology
            .link_between(&ends[0], &ends[1])
            .with_context(|| format!("no link between {} and {}", ends[0], ends[1]))?;
        self.links.get(k).context("link not running")
    }

    /// Plays the scenario's clients and events on a timeline from `t0`.
    fn play(&mut self, s: &Scenario, t0: Instant) -> anyhow::Result<()> {
        let mut timeline: Vec<(f64, Action)> = s
            .clients
            .iter()
            .map(|c| {
                (
                    c.start_s,
                    Action::ClientStart {
                        client: c.id.clone(),
                        stream: c.stream.clone(),
                    },
                )
            })
            .chain(s.events.iter().map(|e| (e.at_s, e.action.clone())))
            .collect();
        timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
        let end = t0 + Duration::from_secs_f64(s.duration_s);
        let mut next = timeline.into_iter().peekable();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            match next.peek() {
                Some((at, _)) if t0 + Duration::from_secs_f64(*at) <= now => {
                    if let Some((at, action)) = next.next() {
                        let what = describe(&action);
                        let t_ms = now.duration_since(t0).as_millis() as u64;
                        let note = self
                            .apply(&action)
                            .with_context(|| format!("event at {at} s"))?;
                        let what = match note {
                            Some(note) => format!("{what}: {note}"),
                            None => what,
                        };
                        eprintln!("t={at:.1} s: {what}");
                        if !matches!(action, Action::ClientStart { .. }) {
                            self.events.push(EventRecord { t_ms, what });
                        }
                    }
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// `viewers.svg` and `parents.svg` in the run's directory (a failure is only said).
    fn write_plots(&self, scenario: &Scenario, report: &Report, t0: Instant) {
        let viewers: Vec<plot::ViewerSeries> = self
            .viewer_samples
            .iter()
            .map(|(name, s)| {
                let s = s.lock().map(|s| s.clone()).unwrap_or_default();
                plot::ViewerSeries::from_samples(name, &s, t0)
            })
            .collect();
        let events: Vec<(f64, String)> = scenario
            .events
            .iter()
            .map(|e| (e.at_s, describe(&e.action)))
            .collect();
        let nodes: Vec<String> = self.samples.keys().cloned().collect();
        let title = format!("{} on {}", scenario.name, self.topology.name);
        match plot::write(
            &self.work_dir,
            &viewers,
            &report.parent_changes,
            &nodes,
            &events,
            scenario.duration_s,
            &title,
        ) {
            Ok(files) => {
                for f in files {
                    eprintln!("plot written to {}", f.display());
                }
            }
            Err(e) => eprintln!("no plots: {e:#}"),
        }
    }

    /// Stops the clients that still run and reads what each received.
    fn finish_clients(&mut self, clips: &[ott_media::Clip]) -> anyhow::Result<Vec<ClientReport>> {
        for c in &mut self.clients {
            c.stop();
        }
        let mut out = Vec::new();
        for c in &self.clients {
            out.push(report::client_report(
                &c.node,
                &c.stream,
                &c.switches,
                report::ClientFiles {
                    output: &c.output,
                    stdout: &c.stdout,
                    log: &c.log,
                },
                clips,
                c.times,
            ));
        }
        Ok(out)
    }
}

/// Set what `change` sets, keep the rest.
fn apply_change(change: &scenario::LinkChange, p: &mut Params) {
    if let Some(d) = change.delay_ms {
        p.delay = Duration::from_secs_f64(d.max(0.0) / 1000.0);
    }
    if let Some(j) = change.jitter_ms {
        p.jitter = Duration::from_secs_f64(j.max(0.0) / 1000.0);
    }
    if let Some(x) = change.loss_pct {
        p.loss_pct = x;
    }
    if let Some(r) = change.rate_mbit {
        p.rate_bps = (r > 0.0).then_some(r * 1e6);
    }
}

fn describe(a: &Action) -> String {
    match a {
        Action::Kill { node } => format!("kill {node}"),
        Action::KillActiveRelay => "kill the most active relay".to_string(),
        Action::Restart { node } => format!("restart {node}"),
        Action::Link { ends, .. } => format!(
            "set link {}-{}{}",
            ends[0],
            ends[1],
            a.link_change().map(describe_change).unwrap_or_default()
        ),
        Action::AllLinks { .. } => format!(
            "set every link{}",
            a.link_change().map(describe_change).unwrap_or_default()
        ),
        Action::LinkDown { ends } => format!("link {}-{} down", ends[0], ends[1]),
        Action::LinkUp { ends } => format!("link {}-{} up", ends[0], ends[1]),
        Action::ClientStart { client, stream } => format!("start client {client} on {stream}"),
        Action::ClientStop { client } => format!("stop client {client}"),
        Action::Switch { client, stream } => format!("client {client} switches to {stream}"),
    }
}

/// `: delay 40 ms, loss 3 %` for the values a link change sets.
fn describe_change(c: scenario::LinkChange) -> String {
    let parts: Vec<String> = [
        c.delay_ms.map(|v| format!("delay {v} ms")),
        c.jitter_ms.map(|v| format!("jitter {v} ms")),
        c.loss_pct.map(|v| format!("loss {v} %")),
        c.rate_mbit.map(|v| format!("rate {v} Mbit/s")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join(", "))
    }
}

/// `GET /status` at `addr`: its `parent`, and how many stream children it has (over
/// all its streams).
fn poll_status(addr: SocketAddr) -> anyhow::Result<(Option<String>, usize)> {
    let body = ott_testkit::http_get(addr, "/status")?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let parent = v.get("parent").and_then(|p| p.as_str()).map(String::from);
    let children = v
        .get("streams")
        .and_then(|s| s.as_object())
        .map_or(0, |streams| {
            streams
                .values()
                .filter_map(|s| s.get("children").and_then(|c| c.as_array()))
                .map(Vec::len)
                .sum()
        });
    Ok((parent, children))
}

impl Drop for Emulation {
    fn drop(&mut self) {
        for c in &mut self.clients {
            if let Some(mut p) = c.proc.take() {
                p.terminate(Duration::from_secs(2));
            }
        }
        for (_, mut p) in std::mem::take(&mut self.procs) {
            p.terminate(Duration::from_secs(2));
        }
        self.stop_pollers.store(true, Ordering::SeqCst);
        for h in self.pollers.drain(..) {
            let _ = h.join();
        }
        // Stopping the forwarders closes the TAP devices.
        self.links.clear();
        for ns in self.ns.values() {
            netns::destroy(ns);
        }
        let _ = std::fs::remove_file(&self.key_file);
    }
}
