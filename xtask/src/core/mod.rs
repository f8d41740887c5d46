//! `cargo xtask core-launch`: a topology as a CORE scenario.
//!
//! [`CoreScenario::build`] turns a [`Topology`] into CORE's model (nodes with interfaces,
//! addresses, canvas positions, services and a per-node startup script; links with
//! their parameters in CORE's units). [`imn`] writes and reads it as CORE's legacy
//! `.imn` (CORE up to 7.5), [`xml`] as the scenario XML of CORE 8 and later.
//!
//! Each node's startup goes through CORE's `UserDefined` service: a script `ott.sh`
//! (one per node, in the node's own directory) starts the right program with the
//! right flags; routers, overlay nodes and clients get `IPForward` and OSPF (zebra +
//! OSPFv2) so that overlay neighbours several hops apart reach each other, as the
//! emulator's computed routes do.

pub(crate) mod imn;
pub(crate) mod xml;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ott_overlay::{AddressPlan, Role, Topology};

/// TCP port of the bootstrapper in a CORE scenario.
pub(crate) const BOOTSTRAP_PORT: u16 = 7070;
/// TCP port of every node's `--status` endpoint in a CORE scenario.
pub(crate) const STATUS_PORT: u16 = 7080;

#[derive(clap::Args)]
pub(crate) struct CoreArgs {
    /// Topology to export.
    #[arg(long, default_value = "topologies/seed.toml")]
    topology: PathBuf,
    /// Output file (default: the topology's name with .imn or .xml, in the current directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// `imn` (CORE up to 7.5) or `xml` (CORE 8 and later).
    #[arg(long, default_value = "imn")]
    format: CoreFormat,
    /// Directory holding the four programs, as seen from inside CORE's nodes.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory of clips for the servers.
    #[arg(long)]
    videos: Option<PathBuf>,
}

/// The two file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CoreFormat {
    /// CORE's Tcl scenario format, read by CORE up to 7.5.
    Imn,
    /// CORE's scenario XML, read by CORE 8 and later.
    Xml,
}

pub(crate) fn run(args: CoreArgs) -> anyhow::Result<()> {
    for w in export(args)? {
        eprintln!("warning: {w}");
    }
    Ok(())
}

/// The programs a scenario of `t` starts.
fn programs_needed(t: &Topology) -> Vec<&'static str> {
    let has = |r: Role| t.nodes.iter().any(|n| n.role == r);
    let mut v = vec!["ott-bootstrap"];
    if has(Role::Server) {
        v.push("ott-server");
    }
    if has(Role::Relay) || has(Role::Pop) {
        v.push("ott-node");
    }
    if has(Role::Client) {
        v.push("ott-client");
    }
    v
}

/// Whether `p` is a file someone may execute.
fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A warning naming the programs of `needed` that are not executable files in `bin_dir`
/// on this machine, or `None` if all are there.
fn missing_programs_warning(bin_dir: &Path, needed: &[&str]) -> Option<String> {
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|name| !is_executable(&bin_dir.join(name)))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let place = if bin_dir.is_dir() {
        format!(
            "{} has no executable {}",
            bin_dir.display(),
            missing.join(", ")
        )
    } else {
        format!(
            "{} does not exist here, so the scenario's programs ({}) are not there",
            bin_dir.display(),
            missing.join(", ")
        )
    };
    Some(format!(
        "{place}. The scenario is written anyway, since --bin-dir is the directory as seen \
         from inside CORE's nodes (it may be a path on CORE's machine); if CORE runs here, \
         build them first (`cargo build --release -p ott-apps`) or pass the right --bin-dir, \
         else the nodes start nothing."
    ))
}

/// Write the scenario; returns the warnings to show.
fn export(args: CoreArgs) -> anyhow::Result<Vec<String>> {
    let root = crate::project_root();
    let topology = Topology::load(&root.join(&args.topology))?;
    let bin_dir = args
        .bin_dir
        .unwrap_or_else(|| root.join("target").join("release"));
    let videos = args.videos.unwrap_or_else(|| root.join("videos"));
    let streams: Vec<String> = ott_media::load_dir(&videos)
        .map(|clips| clips.into_iter().map(|c| c.name).collect())
        .unwrap_or_default();
    let topology_path = root.join(&args.topology);
    let topology_text = std::fs::read_to_string(&topology_path)
        .with_context(|| format!("cannot read {}", topology_path.display()))?;
    let opts = CoreOptions {
        bin_dir,
        videos,
        streams,
        topology_text,
    };
    let scenario = CoreScenario::build(&topology, &opts)?;
    let (text, ext) = match args.format {
        CoreFormat::Imn => (imn::render(&scenario), "imn"),
        CoreFormat::Xml => (xml::render(&scenario), "xml"),
    };
    // Read the file back with the subset reader: a cheap guard against writing
    // something CORE would choke on.
    let (nodes, links) = match args.format {
        CoreFormat::Imn => {
            let doc = imn::parse(&text).context("the generated .imn does not read back")?;
            (doc.nodes.len(), doc.links.len())
        }
        CoreFormat::Xml => {
            let doc = xml::parse(&text).context("the generated XML does not read back")?;
            let count = |a: &str, b: &str| {
                doc.child(a).map_or(0, |d| {
                    d.all(b)
                        .filter(|e| !e.attr("node1").is_empty() || !e.attr("name").is_empty())
                        .count()
                })
            };
            (count("devices", "device"), count("links", "link"))
        }
    };
    if (nodes, links) != (scenario.nodes.len(), scenario.links.len()) {
        anyhow::bail!("the generated file reads back as {nodes} nodes and {links} links");
    }
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from(format!("{}.{ext}", topology.name)));
    std::fs::write(&out, text).with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "wrote {} ({} nodes, {} links); open it in CORE and press start",
        out.display(),
        scenario.nodes.len(),
        scenario.links.len()
    );
    eprintln!("programs are started from {}", opts.bin_dir.display());
    let mut warnings = Vec::new();
    warnings.extend(missing_programs_warning(
        &opts.bin_dir,
        &programs_needed(&topology),
    ));
    if opts.streams.is_empty() && programs_needed(&topology).contains(&"ott-client") {
        warnings.push(format!(
            "no clips found in {} on this machine, so the stream names are unknown: the clients are started without --stream and will exit at once (no terminal to ask on); pass --videos with the clips",
            opts.videos.display()
        ));
    }
    Ok(warnings)
}

/// Where the programs and clips are, as seen from inside CORE's nodes.
#[derive(Debug, Clone)]
pub(crate) struct CoreOptions {
    pub(crate) bin_dir: PathBuf,
    pub(crate) videos: PathBuf,
    /// Stream names; clients watch them in turn.
    pub(crate) streams: Vec<String>,
    /// The topology file's text, handed to the bootstrapper as `topology.toml`.
    pub(crate) topology_text: String,
}

/// CORE's node model for a role: `router` (forwards, runs OSPF) or `PC` (a host).
fn model(role: Role) -> &'static str {
    match role {
        Role::Client => "PC",
        _ => "router",
    }
}

/// One interface of a node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Iface {
    /// `eth0`, `eth1`, ... in link order.
    pub(crate) name: String,
    pub(crate) ip: Ipv4Addr,
    pub(crate) prefix: u8,
    /// The node at the other end.
    pub(crate) peer: String,
}

/// One node of a CORE scenario.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CoreNode {
    /// The topology id (CORE's node name and hostname).
    pub(crate) name: String,
    /// CORE's model: `router` or `PC`.
    pub(crate) model: String,
    pub(crate) x: f64,
    pub(crate) y: f64,
    pub(crate) ifaces: Vec<Iface>,
    pub(crate) services: Vec<String>,
    /// `(file name, text)` of the `UserDefined` service.
    pub(crate) files: Vec<(String, String)>,
    /// Start-up commands of the `UserDefined` service.
    pub(crate) startup: Vec<String>,
}

/// One link, with its parameters in CORE's units.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CoreLink {
    /// Node names, `ends[0]` first.
    pub(crate) ends: [String; 2],
    /// Interface names at each end.
    pub(crate) ifaces: [String; 2],
    pub(crate) delay_us: u64,
    pub(crate) jitter_us: u64,
    /// Bits per second, 0 for unlimited.
    pub(crate) bandwidth_bps: u64,
    pub(crate) loss_pct: f64,
}

/// A whole CORE scenario.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CoreScenario {
    pub(crate) name: String,
    pub(crate) nodes: Vec<CoreNode>,
    pub(crate) links: Vec<CoreLink>,
}

impl CoreScenario {
    /// CORE's model of `t`: addresses from the links plan, a layered layout, and per-node
    /// startup of our programs.
    pub(crate) fn build(t: &Topology, opts: &CoreOptions) -> anyhow::Result<Self> {
        let positions = layout(t);
        // Interface names: eth<k> in the order of the node's links.
        let mut if_names: HashMap<(usize, usize), String> = HashMap::new();
        let mut nodes = Vec::new();
        let boot_ip = t
            .node_ip(&t.bootstrapper, AddressPlan::Links)
            .with_context(|| format!("bootstrapper {} has no link", t.bootstrapper))?;
        let mut client_no = 0usize;
        for (ni, n) in t.nodes.iter().enumerate() {
            let mut ifaces = Vec::new();
            for (k, (li, ip)) in t.link_addresses(&n.id).into_iter().enumerate() {
                let link = &t.links[li];
                let end = usize::from(link.ends[0] != n.id);
                let name = format!("eth{k}");
                if_names.insert((li, end), name.clone());
                ifaces.push(Iface {
                    name,
                    ip,
                    prefix: 24,
                    peer: link.ends[1 - end].clone(),
                });
            }
            let stream = if n.role == Role::Client {
                let s = opts
                    .streams
                    .get(client_no % opts.streams.len().max(1))
                    .cloned();
                client_no += 1;
                s
            } else {
                None
            };
            let script = startup_script(t, n, &ifaces, boot_ip, opts, stream.as_deref());
            let mut services: Vec<String> = Vec::new();
            if n.role != Role::Client {
                services.extend(["zebra", "OSPFv2", "IPForward"].map(String::from));
            }
            let (mut files, startup) = match script {
                Some(s) => {
                    services.push("UserDefined".into());
                    (
                        vec![("ott.sh".to_string(), s)],
                        vec!["sh ott.sh".to_string()],
                    )
                }
                None => (Vec::new(), Vec::new()),
            };
            if n.id == t.bootstrapper {
                files.push(("topology.toml".into(), opts.topology_text.clone()));
            }
            let (x, y) = positions.get(ni).copied().unwrap_or((100.0, 100.0));
            nodes.push(CoreNode {
                name: n.id.clone(),
                model: model(n.role).into(),
                x,
                y,
                ifaces,
                services,
                files,
                startup,
            });
        }
        let links = t
            .links
            .iter()
            .enumerate()
            .map(|(li, l)| CoreLink {
                ends: l.ends.clone(),
                ifaces: [0, 1].map(|e| if_names.get(&(li, e)).cloned().unwrap_or_default()),
                delay_us: (l.delay_ms * 1000.0).round() as u64,
                jitter_us: (l.jitter_ms * 1000.0).round() as u64,
                bandwidth_bps: l.rate_mbit.map_or(0, |r| (r * 1e6).round() as u64),
                loss_pct: l.loss_pct,
            })
            .collect();
        Ok(Self {
            name: t.name.clone(),
            nodes,
            links,
        })
    }
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// The `ott.sh` a node runs at start-up, or `None` for a router.
fn startup_script(
    t: &Topology,
    n: &ott_overlay::NodeSpec,
    ifaces: &[Iface],
    boot_ip: Ipv4Addr,
    opts: &CoreOptions,
    stream: Option<&str>,
) -> Option<String> {
    let bin = |name: &str| sh_quote(&opts.bin_dir.join(name));
    let boot = format!("{boot_ip}:{BOOTSTRAP_PORT}");
    let status = format!("0.0.0.0:{STATUS_PORT}");
    // The programs wait for the bootstrapper while OSPF converges.
    let wait = "--bootstrap-wait 300";
    let mut s = String::from(
        "#!/bin/sh\n# Generated by cargo xtask core-launch: starts this node's OTT program.\n",
    );
    s.push_str("export RUST_LOG=${RUST_LOG:-info} NO_COLOR=1\n");
    if n.id == t.bootstrapper {
        s.push_str(&format!(
            "{} --topology topology.toml --listen 0.0.0.0:{BOOTSTRAP_PORT} --addresses links > bootstrap.log 2>&1 &\n",
            bin("ott-bootstrap"),
        ));
    }
    match n.role {
        Role::Router => return (n.id == t.bootstrapper).then_some(s),
        Role::Server => s.push_str(&format!(
            "{} --id {} --bootstrap {boot} {wait} --videos {} --status {status} > ott.log 2>&1 &\n",
            bin("ott-server"),
            n.id,
            sh_quote(&opts.videos)
        )),
        Role::Relay | Role::Pop => s.push_str(&format!(
            "{} --id {} --bootstrap {boot} {wait} --status {status} > ott.log 2>&1 &\n",
            bin("ott-node"),
            n.id
        )),
        Role::Client => {
            // A host: its default route goes through the node at the other end of its
            // first link.
            if let Some(first) = ifaces.first() {
                if let Some(gw) = t.ip_seen_from(&first.peer, &n.id, AddressPlan::Links) {
                    s.push_str(&format!("ip route add default via {gw} || true\n"));
                }
            }
            let stream = stream.map_or(String::new(), |s| format!(" --stream {s}"));
            s.push_str(&format!(
                "{} --id {} --bootstrap {boot} {wait}{stream} --output {}.out --status {status} > ott.log 2>&1 < /dev/null &\n",
                bin("ott-client"),
                n.id,
                n.id
            ));
        }
    }
    Some(s)
}

/// Canvas positions: layers by underlay hop distance from the first server, each
/// layer spread across the canvas in the order that keeps links short (barycentre of
/// the previous layer).
pub(crate) fn layout(t: &Topology) -> Vec<(f64, f64)> {
    let n = t.nodes.len();
    let index: HashMap<&str, usize> = t
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    let mut adj: Vec<Vec<usize>> = vec![Vec::new(); n];
    for l in &t.links {
        if let (Some(&a), Some(&b)) = (index.get(l.ends[0].as_str()), index.get(l.ends[1].as_str()))
        {
            adj[a].push(b);
            adj[b].push(a);
        }
    }
    let root = t
        .servers()
        .first()
        .and_then(|s| index.get(s.id.as_str()).copied())
        .unwrap_or(0);
    let mut depth = vec![usize::MAX; n];
    let mut queue = VecDeque::new();
    if n > 0 {
        depth[root] = 0;
        queue.push_back(root);
    }
    while let Some(u) = queue.pop_front() {
        for &v in &adj[u] {
            if depth[v] == usize::MAX {
                depth[v] = depth[u] + 1;
                queue.push_back(v);
            }
        }
    }
    let max_depth = depth
        .iter()
        .filter(|&&d| d != usize::MAX)
        .max()
        .copied()
        .unwrap_or(0);
    // Unreachable nodes go in a last row.
    for d in &mut depth {
        if *d == usize::MAX {
            *d = max_depth + 1;
        }
    }
    let mut layers: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &d) in depth.iter().enumerate() {
        layers.entry(d).or_default().push(i);
    }
    let mut pos = vec![(0.0, 0.0); n];
    let width = 1000.0;
    let mut x_of = vec![width / 2.0; n];
    for (&d, members) in &mut layers {
        // Order by the mean x of already-placed neighbours.
        let key = |i: usize| {
            let xs: Vec<f64> = adj[i]
                .iter()
                .filter(|&&v| depth[v] < d)
                .map(|&v| x_of[v])
                .collect();
            if xs.is_empty() {
                width / 2.0
            } else {
                xs.iter().sum::<f64>() / xs.len() as f64
            }
        };
        let mut keyed: Vec<(f64, usize)> = members.iter().map(|&i| (key(i), i)).collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let count = keyed.len() as f64;
        for (k, &(_, i)) in keyed.iter().enumerate() {
            let x = (width * (k as f64 + 0.5) / count).round();
            x_of[i] = x;
            pos[i] = (x, 80.0 + 120.0 * d as f64);
        }
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn seed() -> (Topology, CoreScenario) {
        let root = crate::project_root();
        let t = Topology::load(&root.join("topologies/seed.toml")).expect("seed topology");
        let opts = CoreOptions {
            bin_dir: PathBuf::from("/opt/ott/bin"),
            videos: PathBuf::from("/opt/ott/videos"),
            streams: vec!["bars".into(), "countdown".into()],
            topology_text: std::fs::read_to_string(root.join("topologies/seed.toml"))
                .expect("seed text"),
        };
        let s = CoreScenario::build(&t, &opts).expect("builds");
        (t, s)
    }

    /// A fresh directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("ott-core-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("temp dir");
            Self(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn touch(p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(p, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn a_missing_bin_dir_is_named_with_its_programs_and_the_scenario_is_still_written() {
        let tmp = TempDir::new("missing-bin");
        let out = tmp.0.join("seed.imn");
        let warnings = export(CoreArgs {
            topology: PathBuf::from("topologies/seed.toml"),
            out: Some(out.clone()),
            format: CoreFormat::Imn,
            bin_dir: Some(PathBuf::from("/nonexistent")),
            videos: None,
        })
        .expect("exports");
        assert!(out.is_file(), "the scenario is written anyway");
        let w = warnings
            .iter()
            .find(|w| w.contains("/nonexistent"))
            .unwrap_or_else(|| panic!("no warning about the bin dir: {warnings:?}"));
        assert!(w.contains("/nonexistent does not exist here"), "{w}");
        for p in ["ott-bootstrap", "ott-server", "ott-node", "ott-client"] {
            assert!(w.contains(p), "{p} not named: {w}");
        }
    }

    #[test]
    fn only_the_programs_missing_from_the_bin_dir_are_named() {
        let tmp = TempDir::new("some-bin");
        let all = ["ott-bootstrap", "ott-server", "ott-node", "ott-client"];
        touch(&tmp.0.join("ott-bootstrap"), 0o755);
        touch(&tmp.0.join("ott-server"), 0o644);
        let w = missing_programs_warning(&tmp.0, &all).expect("some are missing");
        assert!(
            w.contains(&format!(
                "{} has no executable ott-server, ott-node, ott-client.",
                tmp.0.display()
            )),
            "{w}"
        );
        for p in &all[1..] {
            touch(&tmp.0.join(p), 0o755);
        }
        assert_eq!(missing_programs_warning(&tmp.0, &all), None);
        // A topology without clients needs no ott-client.
        let t = Topology::parse(
            "name = \"t\"\nbootstrapper = \"s1\"\n[[node]]\nid = \"s1\"\nrole = \"server\"\n[[node]]\nid = \"p1\"\nrole = \"pop\"\n[[link]]\nends = [\"s1\", \"p1\"]\n",
            "test",
        )
        .expect("parses");
        assert_eq!(
            programs_needed(&t),
            ["ott-bootstrap", "ott-server", "ott-node"]
        );
    }

    #[test]
    fn layout_is_distinct_and_inside_the_canvas() {
        let (t, s) = seed();
        let mut seen = std::collections::HashSet::new();
        for n in &s.nodes {
            assert!((0.0..=1000.0).contains(&n.x), "{} x={}", n.name, n.x);
            assert!((0.0..=1000.0).contains(&n.y), "{} y={}", n.name, n.y);
            assert!(seen.insert((n.x as i64, n.y as i64)), "{} overlaps", n.name);
        }
        // The server is on the top row.
        let s1 = s.nodes.iter().find(|n| n.name == "s1").expect("s1");
        assert_eq!(s1.y, 80.0);
        assert_eq!(s.nodes.len(), t.nodes.len());
    }

    #[test]
    fn every_program_node_starts_the_right_binary() {
        let (_, s) = seed();
        let script = |id: &str| {
            let n = s.nodes.iter().find(|n| n.name == id).expect("node");
            n.files.first().map(|f| f.1.clone()).unwrap_or_default()
        };
        assert!(script("s1").contains("/opt/ott/bin/ott-bootstrap"));
        assert!(
            script("s1").contains("/opt/ott/bin/ott-server' --id s1 --bootstrap 10.0.16.1:7070")
        );
        assert!(script("n8").contains("ott-node' --id n8"));
        assert!(script("n16").contains("ott-client' --id n16"));
        assert!(script("n16").contains("ip route add default via 10.0.0.1"));
        assert!(script("n1").is_empty(), "routers run no program");
        let n1 = s.nodes.iter().find(|n| n.name == "n1").expect("n1");
        assert!(n1.services.contains(&"IPForward".to_string()));
    }
}
