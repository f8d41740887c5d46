//! The bootstrapper's dashboard (`ott-bootstrap --http ADDR`): the overlay's live trees.
//!
//! Every server, relay and PoP sends a [`StateReport`] about twice a second (see
//! [`crate::report`]) over UDP to the port of the bootstrapper's TCP address. The
//! [`Table`] keeps the latest report of each node of the topology, accepted only from
//! an address the topology's address plan gives that node (identity by address; with an
//! overlay key the datagram is also unsealed by the [`Opener`] first). Anything else is
//! counted and dropped. A node not heard from for [`TableConfig::dead_after`] (1.5 s) is
//! shown dead; a node that says it is leaving is dead at once.
//!
//! The HTTP side serves:
//! - `/`: a page that draws the overlay as inline SVG, each server's tree over it (parent
//!   arrows, per-link latency, the streams each link carries), every node's state and
//!   each PoP's viewers, and polls `/api/tree` every 500 ms (plain JS in
//!   `/dashboard.js`, no third-party code, nothing fetched from elsewhere).
//! - `/api/tree`: [`Tree`] as JSON: `{"nodes": [{"id", "role", "alive", "parent",
//!   "latency_ms", "hops", "streams", "viewers", …}], "links": [{"a", "b", …}], …}`.
//! - `/metrics`: the reports' counters and the number of nodes alive, Prometheus text.
//!
//! Bounds: one entry per overlay node of the topology, each holding one report of at
//! most [`ott_proto::report::MAX_REPORT_LEN`] bytes; the HTTP server has the limits of
//! [`crate::httpd`]. The table is sans-IO: time is passed in, so tests run it on a fake
//! clock.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use ott_overlay::{AddressPlan, Role, Topology};
use ott_proto::report::{decode_report, NeighbourReport, StateReport};
use ott_proto::untrusted;
use serde::{Deserialize, Serialize};

use crate::httpd::{self, HttpResponse, HttpStats, Limits, Router};

/// How long a node may stay silent before it is shown dead, by default.
pub const DEFAULT_DEAD_AFTER: Duration = Duration::from_millis(1500);

/// Settings of a [`Table`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableConfig {
    /// A node whose last report is older than this is dead.
    pub dead_after: Duration,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            dead_after: DEFAULT_DEAD_AFTER,
        }
    }
}

/// Why a report datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// The sealing layer refused it (bad tag, replay).
    Auth(String),
    /// Not a valid report.
    Malformed(ott_proto::report::ReportError),
    /// Sent from an address that belongs to no overlay node of the topology.
    UnknownAddress(IpAddr),
    /// Sent from the address of other nodes than the one it names.
    WrongId {
        /// The id in the report (escaped, shortened).
        id: String,
        /// The sender.
        from: IpAddr,
    },
    /// Not newer than the report already held (reordered or replayed).
    Stale {
        /// The node.
        id: String,
        /// Its incarnation.
        incarnation: u64,
        /// Its sequence number.
        seq: u64,
    },
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auth(e) => write!(f, "report refused by the overlay key check: {e}"),
            Self::Malformed(e) => write!(f, "malformed report: {e}"),
            Self::UnknownAddress(ip) => {
                write!(f, "report from {ip}, an address of no overlay node")
            }
            Self::WrongId { id, from } => {
                write!(
                    f,
                    "report naming {id} from {from}, which is not that node's address"
                )
            }
            Self::Stale {
                id,
                incarnation,
                seq,
            } => write!(
                f,
                "stale report of {id} (incarnation {incarnation}, seq {seq})"
            ),
        }
    }
}

impl std::error::Error for Rejected {}

impl From<ott_proto::report::ReportError> for Rejected {
    fn from(e: ott_proto::report::ReportError) -> Self {
        Self::Malformed(e)
    }
}

/// Counters of a [`Table`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableStats {
    /// Reports taken.
    pub accepted: u64,
    /// Refused by the overlay key check.
    pub auth_failed: u64,
    /// Not valid reports.
    pub malformed: u64,
    /// From an address of no overlay node.
    pub unknown_address: u64,
    /// Naming another node than the sender's address belongs to.
    pub wrong_id: u64,
    /// Older than the report held.
    pub stale: u64,
}

struct Heard {
    at: Instant,
    report: StateReport,
}

struct Slot {
    id: String,
    role: Role,
    x: f64,
    y: f64,
    heard: Option<Heard>,
}

/// The latest state of every overlay node, from their reports. Sans-IO.
pub struct Table {
    name: String,
    config: TableConfig,
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
    /// Which slots an IP address may speak for.
    by_ip: HashMap<IpAddr, Vec<usize>>,
    /// Overlay neighbour pairs, as slot indices, `a < b`, sorted.
    pairs: Vec<(usize, usize)>,
    stats: TableStats,
}

/// `/api/tree`: the overlay and its trees at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tree {
    /// The topology's name.
    pub topology: String,
    /// How long a node may be silent before it is shown dead, ms.
    pub dead_after_ms: u64,
    /// Every overlay node (server, relay, pop), in topology order.
    pub nodes: Vec<TreeNode>,
    /// Every overlay neighbour pair.
    pub links: Vec<TreeLink>,
    /// Counters of the reports received.
    pub stats: TableStats,
}

/// One node in a [`Tree`]. A dead node (or one never heard from) has no parent,
/// latency, hops, streams or viewers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeNode {
    /// Its id.
    pub id: String,
    /// `server`, `relay` or `pop`, from the topology.
    pub role: String,
    /// Reporting (its last report is recent and did not say it was leaving).
    pub alive: bool,
    /// Its parent towards the server its best route leads to (`null` for a server and
    /// for a node without a route).
    pub parent: Option<String>,
    /// Accumulated latency from that server, ms.
    pub latency_ms: Option<f64>,
    /// Hops from that server.
    pub hops: Option<u32>,
    /// Streams it knows: where each comes from and where it goes.
    pub streams: Vec<TreeStream>,
    /// Viewers attached (PoPs).
    pub viewers: u32,
    /// The server its best route leads to.
    pub server: Option<String>,
    /// Its route towards each server.
    pub routes: Vec<TreeRoute>,
    /// Its neighbours as it sees them.
    pub neighbours: Vec<TreeNeighbour>,
    /// Addresses of some of its viewers.
    pub viewer_addrs: Vec<String>,
    /// Age of its last report, ms (`null` if never heard from).
    pub last_report_ms: Option<u64>,
    /// Horizontal position for drawing, 0 to 1 (layers by hops from the servers).
    pub x: f64,
    /// Vertical position for drawing, 0 (servers) to 1.
    pub y: f64,
}

/// A stream at a node, in a [`TreeNode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeStream {
    /// Its name.
    pub name: String,
    /// The neighbour it comes from (`null` at its server or when not received).
    pub upstream: Option<String>,
    /// Overlay nodes it goes to.
    pub children: Vec<String>,
    /// Viewers it goes to.
    pub viewers: u32,
}

/// A route in a [`TreeNode`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeRoute {
    /// The server.
    pub server: String,
    /// The parent towards it.
    pub parent: Option<String>,
    /// Accumulated latency, ms.
    pub latency_ms: Option<f64>,
    /// Hops.
    pub hops: Option<u32>,
}

/// A neighbour in a [`TreeNode`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeNeighbour {
    /// Its id.
    pub id: String,
    /// Alive by the node's heartbeats.
    pub alive: bool,
    /// Smoothed round-trip time, ms.
    pub rtt_ms: Option<f64>,
}

/// An overlay neighbour pair in a [`Tree`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeLink {
    /// One end (the first in topology order).
    pub a: String,
    /// The other end.
    pub b: String,
    /// Both ends alive and neither sees the other dead.
    pub alive: bool,
    /// One-way latency, half the RTT the ends measured (their mean), ms.
    pub latency_ms: Option<f64>,
    /// The servers whose tree uses this link, with the direction.
    pub trees: Vec<LinkTree>,
    /// The streams flowing over this link, with the direction.
    pub streams: Vec<LinkStream>,
}

/// A server's tree edge over a [`TreeLink`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkTree {
    /// The server.
    pub server: String,
    /// The parent end.
    pub parent: String,
    /// The child end.
    pub child: String,
}

/// A stream flowing over a [`TreeLink`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStream {
    /// Its name.
    pub name: String,
    /// The sending end.
    pub from: String,
    /// The receiving end.
    pub to: String,
}

fn ms(us: Option<u64>) -> Option<f64> {
    us.map(|us| us as f64 / 1000.0)
}

impl Table {
    /// A table for the overlay nodes of `topology`, whose addresses follow `plan`.
    pub fn new(topology: &Topology, plan: AddressPlan, config: TableConfig) -> Self {
        let overlay: Vec<&ott_overlay::NodeSpec> = topology
            .nodes
            .iter()
            .filter(|n| n.role.is_overlay())
            .collect();
        let index: HashMap<String, usize> = overlay
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.clone(), i))
            .collect();
        let mut by_ip: HashMap<IpAddr, Vec<usize>> = HashMap::new();
        let mut pairs = BTreeSet::new();
        let mut adjacency = vec![Vec::new(); overlay.len()];
        for (i, n) in overlay.iter().enumerate() {
            // Every address the bootstrapper gives for it (those in the file, or one per
            // link in the links plan): it may send from any of them.
            let ips: BTreeSet<IpAddr> = topology
                .addresses(&n.id, plan)
                .into_iter()
                .map(IpAddr::V4)
                .collect();
            for ip in ips {
                by_ip.entry(ip).or_default().push(i);
            }
            for other in topology.overlay_neighbours(&n.id) {
                if let Some(&j) = index.get(&other) {
                    adjacency[i].push(j);
                    pairs.insert((i.min(j), i.max(j)));
                }
            }
        }
        let roots: Vec<usize> = overlay
            .iter()
            .enumerate()
            .filter(|(_, n)| n.role == Role::Server)
            .map(|(i, _)| i)
            .collect();
        let positions = layout(&adjacency, &roots);
        let slots = overlay
            .iter()
            .zip(positions)
            .map(|(n, (x, y))| Slot {
                id: n.id.clone(),
                role: n.role,
                x,
                y,
                heard: None,
            })
            .collect();
        Self {
            name: topology.name.clone(),
            config,
            slots,
            index,
            by_ip,
            pairs: pairs.into_iter().collect(),
            stats: TableStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> TableStats {
        self.stats
    }

    /// Number of overlay nodes, and how many of them are alive at `now`.
    pub fn alive_count(&self, now: Instant) -> (usize, usize) {
        let alive = self.slots.iter().filter(|s| self.is_alive(s, now)).count();
        (self.slots.len(), alive)
    }

    /// Count a datagram the sealing layer refused.
    pub fn auth_failed(&mut self) {
        self.stats.auth_failed += 1;
    }

    /// Take one report datagram that arrived at `now` from `from`; a refusal is counted
    /// and says why.
    pub fn handle(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<(), Rejected> {
        let result = self.take(now, from, datagram);
        let s = &mut self.stats;
        match &result {
            Ok(()) => s.accepted += 1,
            Err(Rejected::Auth(_)) => s.auth_failed += 1,
            Err(Rejected::Malformed(_)) => s.malformed += 1,
            Err(Rejected::UnknownAddress(_)) => s.unknown_address += 1,
            Err(Rejected::WrongId { .. }) => s.wrong_id += 1,
            Err(Rejected::Stale { .. }) => s.stale += 1,
        }
        result
    }

    fn take(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> Result<(), Rejected> {
        let ip = from.ip();
        let Some(allowed) = self.by_ip.get(&ip) else {
            return Err(Rejected::UnknownAddress(ip));
        };
        let report = decode_report(datagram)?;
        let slot = self
            .index
            .get(&report.id)
            .copied()
            .filter(|i| allowed.contains(i))
            .ok_or_else(|| Rejected::WrongId {
                id: untrusted(&report.id).to_string(),
                from: ip,
            })?;
        let dead_after = self.config.dead_after;
        let s = &mut self.slots[slot];
        if let Some(h) = &s.heard {
            let recent = now.saturating_duration_since(h.at) < dead_after;
            let newer = (report.incarnation, report.seq) > (h.report.incarnation, h.report.seq);
            // After a silence any report counts: a restarted node whose clock went back
            // gets a smaller incarnation, and must not be ignored for good.
            if recent && !newer {
                return Err(Rejected::Stale {
                    id: s.id.clone(),
                    incarnation: report.incarnation,
                    seq: report.seq,
                });
            }
        }
        s.heard = Some(Heard { at: now, report });
        Ok(())
    }

    fn is_alive(&self, s: &Slot, now: Instant) -> bool {
        s.heard.as_ref().is_some_and(|h| {
            !h.report.leaving && now.saturating_duration_since(h.at) < self.config.dead_after
        })
    }

    /// The report of the node at `slot` if it is alive at `now`.
    fn live_report(&self, slot: usize, now: Instant) -> Option<&StateReport> {
        let s = self.slots.get(slot)?;
        if self.is_alive(s, now) {
            s.heard.as_ref().map(|h| &h.report)
        } else {
            None
        }
    }

    /// The whole overlay at `now`, for `/api/tree`.
    pub fn tree(&self, now: Instant) -> Tree {
        let nodes = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| self.tree_node(i, s, now))
            .collect();
        let links = self
            .pairs
            .iter()
            .map(|&(a, b)| self.tree_link(a, b, now))
            .collect();
        Tree {
            topology: self.name.clone(),
            dead_after_ms: u64::try_from(self.config.dead_after.as_millis()).unwrap_or(u64::MAX),
            nodes,
            links,
            stats: self.stats,
        }
    }

    fn tree_node(&self, i: usize, s: &Slot, now: Instant) -> TreeNode {
        let last_report_ms = s.heard.as_ref().map(|h| {
            u64::try_from(now.saturating_duration_since(h.at).as_millis()).unwrap_or(u64::MAX)
        });
        let mut n = TreeNode {
            id: s.id.clone(),
            role: s.role.to_string(),
            alive: false,
            parent: None,
            latency_ms: None,
            hops: None,
            streams: Vec::new(),
            viewers: 0,
            server: None,
            routes: Vec::new(),
            neighbours: Vec::new(),
            viewer_addrs: Vec::new(),
            last_report_ms,
            x: s.x,
            y: s.y,
        };
        let Some(r) = self.live_report(i, now) else {
            return n;
        };
        n.alive = true;
        n.parent = r.parent.clone();
        n.latency_ms = ms(r.latency_us);
        n.hops = r.hops;
        n.server = r.server.clone();
        n.viewers = r.viewers;
        n.viewer_addrs = r.viewer_addrs.clone();
        n.streams = r
            .streams
            .iter()
            .map(|st| TreeStream {
                name: st.name.clone(),
                upstream: st.upstream.clone(),
                children: st.children.clone(),
                viewers: st.viewers,
            })
            .collect();
        n.routes = r
            .routes
            .iter()
            .map(|rt| TreeRoute {
                server: rt.server.clone(),
                parent: rt.parent.clone(),
                latency_ms: ms(rt.latency_us),
                hops: rt.hops,
            })
            .collect();
        n.neighbours = r
            .neighbours
            .iter()
            .map(|nb| TreeNeighbour {
                id: nb.id.clone(),
                alive: nb.alive,
                rtt_ms: ms(nb.rtt_us),
            })
            .collect();
        n
    }

    fn tree_link(&self, a: usize, b: usize, now: Instant) -> TreeLink {
        let (ida, idb) = (&self.slots[a].id, &self.slots[b].id);
        let (ra, rb) = (self.live_report(a, now), self.live_report(b, now));
        fn seen<'a>(r: Option<&'a StateReport>, other: &str) -> Option<&'a NeighbourReport> {
            r.and_then(|r| r.neighbours.iter().find(|n| n.id == other))
        }
        let (na, nb) = (seen(ra, idb), seen(rb, ida));
        let alive = ra.is_some()
            && rb.is_some()
            && na.is_none_or(|n| n.alive)
            && nb.is_none_or(|n| n.alive);
        let rtts: Vec<u64> = [na, nb]
            .into_iter()
            .flatten()
            .filter(|n| n.alive)
            .filter_map(|n| n.rtt_us)
            .collect();
        let latency_ms = (!rtts.is_empty())
            .then(|| rtts.iter().sum::<u64>() as f64 / rtts.len() as f64 / 2000.0);
        let mut trees = Vec::new();
        let mut streams = Vec::new();
        for (child, parent, r, role) in [
            (ida, idb, ra, self.slots[a].role),
            (idb, ida, rb, self.slots[b].role),
        ] {
            let Some(r) = r else { continue };
            // A server's route to another server distributes nothing: not a tree edge.
            let routes = if role == Role::Server {
                &[][..]
            } else {
                &r.routes[..]
            };
            for rt in routes {
                if rt.parent.as_deref() == Some(parent.as_str()) {
                    trees.push(LinkTree {
                        server: rt.server.clone(),
                        parent: parent.clone(),
                        child: child.clone(),
                    });
                }
            }
            for st in &r.streams {
                if st.upstream.as_deref() == Some(parent.as_str()) {
                    streams.push(LinkStream {
                        name: st.name.clone(),
                        from: parent.clone(),
                        to: child.clone(),
                    });
                }
            }
        }
        TreeLink {
            a: ida.clone(),
            b: idb.clone(),
            alive,
            latency_ms,
            trees,
            streams,
        }
    }
}

/// Positions for drawing: layers by hops from the nearest root (a server), top to
/// bottom; within a layer, nodes ordered by the mean position of their neighbours in
/// the layer above (a few sweeps of the barycentre heuristic), to keep lines short and
/// crossings few. Nodes no root reaches go in a last layer.
fn layout(adjacency: &[Vec<usize>], roots: &[usize]) -> Vec<(f64, f64)> {
    let n = adjacency.len();
    let mut layer = vec![usize::MAX; n];
    let mut queue = VecDeque::new();
    for &r in roots {
        layer[r] = 0;
        queue.push_back(r);
    }
    while let Some(u) = queue.pop_front() {
        for &v in &adjacency[u] {
            if layer[v] == usize::MAX {
                layer[v] = layer[u] + 1;
                queue.push_back(v);
            }
        }
    }
    let deepest = layer
        .iter()
        .copied()
        .filter(|&l| l != usize::MAX)
        .max()
        .unwrap_or(0);
    let unreachable = if layer.contains(&usize::MAX) {
        deepest + 1
    } else {
        deepest
    };
    for l in &mut layer {
        if *l == usize::MAX {
            *l = unreachable;
        }
    }
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); unreachable + 1];
    for (i, &l) in layer.iter().enumerate() {
        rows[l].push(i);
    }
    let mut pos = vec![0.0f64; n];
    let place = |rows: &Vec<Vec<usize>>, pos: &mut Vec<f64>| {
        for row in rows {
            for (k, &i) in row.iter().enumerate() {
                pos[i] = (k as f64 + 1.0) / (row.len() as f64 + 1.0);
            }
        }
    };
    place(&rows, &mut pos);
    for sweep in 0..4 {
        // Even sweeps go down (look at the layer above), odd ones up.
        let order: Vec<usize> = if sweep % 2 == 0 {
            (1..rows.len()).collect()
        } else {
            (0..rows.len().saturating_sub(1)).rev().collect()
        };
        for l in order {
            let look = if sweep % 2 == 0 { l - 1 } else { l + 1 };
            let mut keyed: Vec<(f64, usize)> = rows[l]
                .iter()
                .map(|&i| {
                    let near: Vec<f64> = adjacency[i]
                        .iter()
                        .filter(|&&j| layer[j] == look)
                        .map(|&j| pos[j])
                        .collect();
                    let key = if near.is_empty() {
                        pos[i]
                    } else {
                        near.iter().sum::<f64>() / near.len() as f64
                    };
                    (key, i)
                })
                .collect();
            keyed.sort_by(|x, y| x.0.total_cmp(&y.0));
            rows[l] = keyed.into_iter().map(|(_, i)| i).collect();
            for (k, &i) in rows[l].iter().enumerate() {
                pos[i] = (k as f64 + 1.0) / (rows[l].len() as f64 + 1.0);
            }
        }
    }
    let depth = rows.len().saturating_sub(1).max(1) as f64;
    (0..n).map(|i| (pos[i], layer[i] as f64 / depth)).collect()
}

/// Unwraps a report datagram before it is decoded: the place where the overlay key's
/// check goes (the error is counted as `auth_failed`). Without a key, the identity.
pub type Opener = Box<dyn FnMut(SocketAddr, &[u8]) -> Result<Vec<u8>, String> + Send>;

/// A running dashboard: its table and its HTTP server.
pub struct Dashboard {
    table: Arc<Mutex<Table>>,
    http: httpd::Server,
    reports: SocketAddr,
}

fn lock(t: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // A panic while holding the lock leaves the table as it was: still usable.
    t.lock().unwrap_or_else(|e| e.into_inner())
}

impl Dashboard {
    /// The HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr()
    }

    /// The UDP address reports are received on.
    pub fn report_addr(&self) -> SocketAddr {
        self.reports
    }

    /// The tree now (what `/api/tree` serves).
    pub fn tree(&self) -> Tree {
        lock(&self.table).tree(Instant::now())
    }
}

/// Receive reports on `udp` into `table` (through `opener` if given) and serve the
/// dashboard on `http`, from background threads.
pub fn serve(
    http: SocketAddr,
    udp: UdpSocket,
    table: Table,
    opener: Option<Opener>,
) -> anyhow::Result<Dashboard> {
    serve_with(http, udp, table, opener, None)
}

/// More Prometheus text for `/metrics` (the bootstrapper's own counters), made at
/// each request.
pub type ExtraMetrics = Box<dyn Fn() -> String + Send + Sync>;

/// [`serve`], with `extra` appended to `/metrics`.
pub fn serve_with(
    http: SocketAddr,
    udp: UdpSocket,
    table: Table,
    opener: Option<Opener>,
    extra: Option<ExtraMetrics>,
) -> anyhow::Result<Dashboard> {
    let reports = udp.local_addr()?;
    let table = Arc::new(Mutex::new(table));
    let rx_table = table.clone();
    thread::Builder::new()
        .name("reports-rx".into())
        .spawn(move || receive(&udp, &rx_table, opener))?;
    let stats = Arc::new(HttpStats::new("dashboard"));
    let server = httpd::serve(
        http,
        router(table.clone(), stats.clone(), extra),
        Limits::default(),
        stats,
    )?;
    tracing::info!(http = %server.local_addr(), %reports, "dashboard listening");
    Ok(Dashboard {
        table,
        http: server,
        reports,
    })
}

fn receive(udp: &UdpSocket, table: &Mutex<Table>, mut opener: Option<Opener>) {
    let mut buf = vec![0u8; 65536];
    loop {
        let (len, from) = match udp.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "report receive error");
                // Never spin if the error repeats.
                thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        let now = Instant::now();
        let datagram = &buf[..len];
        let result = match &mut opener {
            Some(open) => match open(from, datagram) {
                Ok(body) => lock(table).handle(now, from, &body),
                Err(e) => {
                    lock(table).auth_failed();
                    Err(Rejected::Auth(e))
                }
            },
            None => lock(table).handle(now, from, datagram),
        };
        if let Err(e) = result {
            tracing::debug!(%from, error = %e, "state report dropped");
        }
    }
}

const PAGE: &str = include_str!("dashboard.html");
const SCRIPT: &str = include_str!("dashboard.js");

fn router(table: Arc<Mutex<Table>>, stats: Arc<HttpStats>, extra: Option<ExtraMetrics>) -> Router {
    let for_tree = table.clone();
    Router::new()
        .get("/", |_| {
            HttpResponse::new(200, "text/html; charset=utf-8", PAGE)
                .with_header(
                    "Content-Security-Policy",
                    "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self'; frame-ancestors 'none'",
                )
                .with_header("X-Frame-Options", "DENY")
                .into()
        })
        .get("/dashboard.js", |_| {
            HttpResponse::new(200, "text/javascript; charset=utf-8", SCRIPT).into()
        })
        .get("/api/tree", move |_| {
            let tree = lock(&for_tree).tree(Instant::now());
            let body = serde_json::to_string(&tree).unwrap_or_else(|_| "{}".into());
            HttpResponse::new(200, "application/json", body).into()
        })
        .get("/metrics", move |_| {
            let now = Instant::now();
            let (s, (nodes, alive)) = {
                let t = lock(&table);
                (t.stats(), t.alive_count(now))
            };
            let mut text = metrics(&s, nodes, alive);
            text.push_str(&httpd::prometheus(&[&stats]));
            if let Some(extra) = &extra {
                text.push_str(&extra());
            }
            HttpResponse::new(200, "text/plain; version=0.0.4", text).into()
        })
}

/// The bootstrapper's connection counters as Prometheus text: what the caps on pending
/// connections (the whole-request deadline, the per-address limit, the total) did.
pub fn bootstrap_metrics(s: &ott_bootstrap::ServiceStats) -> String {
    let mut out = String::from(
        "# HELP ott_bootstrap_connections_total Bootstrap connections and requests, by outcome \
         (timed_out: no whole request by the deadline; evicted: closed for a new one at the \
         per-address or total cap; busy: refused at once).\n\
         # TYPE ott_bootstrap_connections_total counter\n",
    );
    for (result, v) in [
        ("accepted", s.accepted),
        ("assigned", s.assigned),
        ("refused", s.refused),
        ("malformed", s.malformed),
        ("timed_out", s.timed_out),
        ("evicted", s.evicted),
        ("busy", s.busy),
    ] {
        out.push_str(&format!(
            "ott_bootstrap_connections_total{{result=\"{result}\"}} {v}\n"
        ));
    }
    out
}

/// The dashboard's Prometheus text: reports by outcome, nodes alive and in all.
pub fn metrics(s: &TableStats, nodes: usize, alive: usize) -> String {
    let mut out = String::from(
        "# HELP ott_dashboard_reports_total State reports received, by outcome.\n\
         # TYPE ott_dashboard_reports_total counter\n",
    );
    for (result, v) in [
        ("accepted", s.accepted),
        ("auth_failed", s.auth_failed),
        ("malformed", s.malformed),
        ("unknown_address", s.unknown_address),
        ("wrong_id", s.wrong_id),
        ("stale", s.stale),
    ] {
        out.push_str(&format!(
            "ott_dashboard_reports_total{{result=\"{result}\"}} {v}\n"
        ));
    }
    out.push_str(&format!(
        "# HELP ott_dashboard_nodes Overlay nodes of the topology.\n\
         # TYPE ott_dashboard_nodes gauge\nott_dashboard_nodes {nodes}\n\
         # HELP ott_dashboard_nodes_alive Overlay nodes reporting.\n\
         # TYPE ott_dashboard_nodes_alive gauge\nott_dashboard_nodes_alive {alive}\n"
    ));
    out
}

/// The servers' trees as indented text, one tree per server (each node under its
/// parent towards that server, with that route's latency and hops, the streams it takes
/// from that parent, and its viewers), then the nodes in no tree: for terminals,
/// reports and tests.
pub fn render_text(tree: &Tree) -> String {
    let mut children: BTreeMap<(&str, &str), Vec<(&TreeNode, &TreeRoute)>> = BTreeMap::new();
    // Servers' routes to other servers are left out: they distribute nothing.
    for n in tree.nodes.iter().filter(|n| n.alive && n.role != "server") {
        for r in &n.routes {
            if let Some(p) = &r.parent {
                children.entry((&r.server, p)).or_default().push((n, r));
            }
        }
    }
    let mut out = String::new();
    let mut placed = BTreeSet::new();
    let mut stack: Vec<(&str, &TreeNode, Option<&TreeRoute>, usize)> = tree
        .nodes
        .iter()
        .filter(|n| n.role == "server")
        .rev()
        .map(|s| (s.id.as_str(), s, None, 0))
        .collect();
    while let Some((server, n, route, depth)) = stack.pop() {
        placed.insert(n.id.as_str());
        out.push_str(&"  ".repeat(depth));
        out.push_str(&describe(n, route));
        out.push('\n');
        // A report may name a parent that is its own descendant for a moment: never
        // walk deeper than there are nodes.
        if depth > tree.nodes.len() {
            continue;
        }
        for (c, r) in children
            .get(&(server, n.id.as_str()))
            .into_iter()
            .flatten()
            .rev()
        {
            stack.push((server, c, Some(r), depth + 1));
        }
    }
    let rest: Vec<&TreeNode> = tree
        .nodes
        .iter()
        .filter(|n| !placed.contains(n.id.as_str()))
        .collect();
    if !rest.is_empty() {
        out.push_str("in no tree:\n");
        for n in rest {
            out.push_str(&describe(n, None));
            out.push('\n');
        }
    }
    out
}

fn describe(n: &TreeNode, route: Option<&TreeRoute>) -> String {
    let mut line = format!("{} ({})", n.id, n.role);
    if !n.alive {
        line.push_str(if n.last_report_ms.is_some() {
            " DEAD"
        } else {
            " never heard from"
        });
        return line;
    }
    match route {
        Some(r) => {
            if let (Some(l), Some(h)) = (r.latency_ms, r.hops) {
                line.push_str(&format!(
                    " {l:.2} ms, {h} hop{}",
                    if h == 1 { "" } else { "s" }
                ));
            }
            let taken: Vec<&str> = n
                .streams
                .iter()
                .filter(|s| s.upstream.is_some() && s.upstream == r.parent)
                .map(|s| s.name.as_str())
                .collect();
            if !taken.is_empty() {
                line.push_str(&format!(" [{}]", taken.join(", ")));
            }
        }
        None if n.role != "server" => line.push_str(" no route"),
        None => {}
    }
    if n.role == "pop" {
        line.push_str(&format!(
            " {} viewer{}",
            n.viewers,
            if n.viewers == 1 { "" } else { "s" }
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use ott_proto::report::{encode_report, RouteReport, StreamReport};

    const DIAMOND: &str = r#"
name = "diamond"
bootstrapper = "s1"
[[node]]
id = "s1"
role = "server"
[[node]]
id = "r1"
role = "relay"
[[node]]
id = "r2"
role = "relay"
[[node]]
id = "p1"
role = "pop"
[[node]]
id = "c1"
role = "client"
[[link]]
ends = ["s1", "r1"]
[[link]]
ends = ["s1", "r2"]
[[link]]
ends = ["r1", "p1"]
[[link]]
ends = ["r2", "p1"]
[[link]]
ends = ["p1", "c1"]
"#;

    fn topology() -> Topology {
        Topology::parse(DIAMOND, "diamond.toml").expect("valid")
    }

    fn addr(t: &Topology, id: &str, plan: AddressPlan) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(t.node_ip(id, plan).expect("has ip")), 40000)
    }

    /// A node's report: its parent towards s1, the stream "news" from that parent.
    fn report(id: &str, seq: u64, parent: Option<&str>, hops: u32) -> StateReport {
        let neighbours = match id {
            "s1" => vec!["r1", "r2"],
            "p1" => vec!["r1", "r2"],
            _ => vec!["p1", "s1"],
        };
        StateReport {
            id: id.into(),
            role: "relay".into(),
            incarnation: 1,
            seq,
            server: Some("s1".into()),
            parent: parent.map(Into::into),
            latency_us: Some(u64::from(hops) * 1000),
            hops: Some(hops),
            routes: vec![RouteReport {
                server: "s1".into(),
                parent: parent.map(Into::into),
                latency_us: Some(u64::from(hops) * 1000),
                hops: Some(hops),
            }],
            streams: vec![StreamReport {
                name: "news".into(),
                upstream: parent.map(Into::into),
                children: vec![],
                viewers: if id == "p1" { 2 } else { 0 },
            }],
            neighbours: neighbours
                .into_iter()
                .map(|n| NeighbourReport {
                    id: n.into(),
                    alive: true,
                    rtt_us: Some(2000),
                })
                .collect(),
            viewers: if id == "p1" { 2 } else { 0 },
            ..StateReport::default()
        }
    }

    fn send(t: &mut Table, now: Instant, topo: &Topology, r: &StateReport) -> Result<(), Rejected> {
        let from = addr(topo, &r.id, AddressPlan::Loopback);
        t.handle(now, from, &encode_report(r).expect("encodes"))
    }

    fn node<'a>(tree: &'a Tree, id: &str) -> &'a TreeNode {
        tree.nodes.iter().find(|n| n.id == id).expect("node listed")
    }

    #[test]
    fn test_reports_in_tree_out() {
        let topo = topology();
        let mut t = Table::new(&topo, AddressPlan::Loopback, TableConfig::default());
        let t0 = Instant::now();
        // Before any report: every overlay node listed, dead, no parent.
        let tree = t.tree(t0);
        let ids: Vec<&str> = tree.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(
            ids,
            ["s1", "r1", "r2", "p1"],
            "overlay nodes only, topology order"
        );
        assert!(tree.nodes.iter().all(|n| !n.alive && n.parent.is_none()));
        assert_eq!(tree.links.len(), 4);
        for r in [
            report("s1", 1, None, 0),
            report("r1", 1, Some("s1"), 1),
            report("r2", 1, Some("s1"), 1),
            report("p1", 1, Some("r1"), 2),
        ] {
            send(&mut t, t0, &topo, &r).expect("accepted");
        }
        let tree = t.tree(t0 + Duration::from_millis(100));
        assert!(tree.nodes.iter().all(|n| n.alive));
        assert_eq!(node(&tree, "p1").parent.as_deref(), Some("r1"));
        assert_eq!(node(&tree, "p1").viewers, 2);
        assert_eq!(node(&tree, "p1").hops, Some(2));
        assert_eq!(node(&tree, "p1").latency_ms, Some(2.0));
        assert_eq!(node(&tree, "p1").last_report_ms, Some(100));
        assert_eq!(node(&tree, "s1").parent, None);
        let json = serde_json::to_value(&tree).expect("serializes");
        for key in [
            "id",
            "role",
            "alive",
            "parent",
            "latency_ms",
            "hops",
            "streams",
            "viewers",
        ] {
            assert!(json["nodes"][0].get(key).is_some(), "node field {key}");
        }
        let link = tree
            .links
            .iter()
            .find(|l| (l.a.as_str(), l.b.as_str()) == ("r1", "p1"))
            .expect("link r1-p1");
        assert!(link.alive);
        assert_eq!(link.latency_ms, Some(1.0), "half the 2 ms RTT");
        assert_eq!(
            link.streams,
            vec![LinkStream {
                name: "news".into(),
                from: "r1".into(),
                to: "p1".into()
            }]
        );
        assert_eq!(link.trees.len(), 1);
        let idle = tree
            .links
            .iter()
            .find(|l| (l.a.as_str(), l.b.as_str()) == ("r2", "p1"))
            .expect("link r2-p1");
        assert!(idle.streams.is_empty() && idle.trees.is_empty());
        assert_eq!(
            render_text(&tree),
            "s1 (server)\n  r1 (relay) 1.00 ms, 1 hop [news]\n    p1 (pop) 2.00 ms, 2 hops [news] 2 viewers\n  r2 (relay) 1.00 ms, 1 hop [news]\n"
        );
    }

    #[test]
    fn test_silent_node_is_dead_within_two_seconds_and_tree_heals() {
        let topo = topology();
        let mut t = Table::new(&topo, AddressPlan::Loopback, TableConfig::default());
        let t0 = Instant::now();
        let mut at = t0;
        let mut seq = 0;
        // Everyone reports every 500 ms; r1 stops after t0.
        for step in 0..6 {
            seq += 1;
            send(&mut t, at, &topo, &report("s1", seq, None, 0)).expect("s1");
            send(&mut t, at, &topo, &report("r2", seq, Some("s1"), 1)).expect("r2");
            let p1_parent = if step == 0 { "r1" } else { "r2" };
            send(&mut t, at, &topo, &report("p1", seq, Some(p1_parent), 2)).expect("p1");
            if step == 0 {
                send(&mut t, at, &topo, &report("r1", seq, Some("s1"), 1)).expect("r1");
            }
            at += Duration::from_millis(500);
        }
        assert!(node(&t.tree(t0 + Duration::from_millis(1400)), "r1").alive);
        let tree = t.tree(t0 + Duration::from_millis(1500));
        let r1 = node(&tree, "r1");
        assert!(!r1.alive, "silent for 1.5 s: dead");
        assert_eq!(r1.parent, None);
        assert!(r1.streams.is_empty());
        assert_eq!(r1.last_report_ms, Some(1500));
        assert_eq!(node(&tree, "p1").parent.as_deref(), Some("r2"));
        let r1p1 = tree
            .links
            .iter()
            .find(|l| (l.a.as_str(), l.b.as_str()) == ("r1", "p1"))
            .expect("link");
        assert!(!r1p1.alive && r1p1.streams.is_empty());
        assert_eq!(t.alive_count(t0 + Duration::from_millis(1500)), (4, 3));
        assert!(render_text(&tree).ends_with("in no tree:\nr1 (relay) DEAD\n"));
    }

    #[test]
    fn test_leaving_node_is_dead_at_once() {
        let topo = topology();
        let mut t = Table::new(&topo, AddressPlan::Loopback, TableConfig::default());
        let t0 = Instant::now();
        send(&mut t, t0, &topo, &report("r2", 1, Some("s1"), 1)).expect("r2");
        let mut bye = report("r2", 2, None, 0);
        bye.leaving = true;
        send(&mut t, t0, &topo, &bye).expect("leaving accepted");
        assert!(!node(&t.tree(t0), "r2").alive);
    }

    #[test]
    fn test_reports_from_elsewhere_are_counted_and_dropped() {
        let topo = topology();
        let mut t = Table::new(&topo, AddressPlan::Loopback, TableConfig::default());
        let t0 = Instant::now();
        let good = encode_report(&report("p1", 5, Some("r1"), 2)).expect("encodes");
        // A stranger's address.
        let stranger: SocketAddr = "127.9.9.9:5000".parse().expect("addr");
        assert!(matches!(
            t.handle(t0, stranger, &good),
            Err(Rejected::UnknownAddress(_))
        ));
        // r1 speaking for p1.
        let r1 = addr(&topo, "r1", AddressPlan::Loopback);
        assert!(matches!(
            t.handle(t0, r1, &good),
            Err(Rejected::WrongId { .. })
        ));
        // The client node of the topology is not an overlay node.
        let c1 = addr(&topo, "c1", AddressPlan::Loopback);
        assert!(matches!(
            t.handle(t0, c1, &good),
            Err(Rejected::UnknownAddress(_))
        ));
        // Garbage from a member's address.
        let p1 = addr(&topo, "p1", AddressPlan::Loopback);
        assert!(matches!(
            t.handle(t0, p1, b"OR\x01\xc1"),
            Err(Rejected::Malformed(_))
        ));
        // The real one, then a replay of it and an older one.
        t.handle(t0, p1, &good).expect("accepted");
        assert!(matches!(
            t.handle(t0, p1, &good),
            Err(Rejected::Stale { .. })
        ));
        let old = encode_report(&report("p1", 4, Some("r2"), 2)).expect("encodes");
        assert!(matches!(
            t.handle(t0, p1, &old),
            Err(Rejected::Stale { .. })
        ));
        assert_eq!(node(&t.tree(t0), "p1").parent.as_deref(), Some("r1"));
        // A new incarnation starts its seq again.
        let mut restarted = report("p1", 1, Some("r2"), 2);
        restarted.incarnation = 2;
        send(&mut t, t0, &topo, &restarted).expect("new incarnation");
        assert_eq!(
            t.stats(),
            TableStats {
                accepted: 2,
                auth_failed: 0,
                malformed: 1,
                unknown_address: 2,
                wrong_id: 1,
                stale: 2,
            }
        );
        let m = metrics(&t.stats(), 4, 1);
        assert!(m.contains("ott_dashboard_reports_total{result=\"unknown_address\"} 2\n"));
        assert!(m.contains("ott_dashboard_nodes_alive 1\n"));
    }

    #[test]
    fn test_links_plan_accepts_every_link_address_of_a_node() {
        let topo = topology();
        let mut t = Table::new(&topo, AddressPlan::Links, TableConfig::default());
        let t0 = Instant::now();
        // p1 is an end of links 2, 3 and 4: it may send from any of them.
        for (k, (_, ip)) in topo.link_addresses("p1").into_iter().enumerate() {
            let from = SocketAddr::new(IpAddr::V4(ip), 40000);
            let r = encode_report(&report("p1", k as u64 + 1, Some("r1"), 2)).expect("encodes");
            t.handle(t0, from, &r).expect("a link address of p1");
        }
        assert_eq!(t.stats().accepted, 3);
    }

    #[test]
    fn test_layout_layers_by_hops_from_the_servers() {
        let topo = topology();
        let t = Table::new(&topo, AddressPlan::Loopback, TableConfig::default());
        let tree = t.tree(Instant::now());
        let y: Vec<f64> = tree.nodes.iter().map(|n| n.y).collect();
        assert_eq!(y, [0.0, 0.5, 0.5, 1.0]);
        assert!(node(&tree, "r1").x < node(&tree, "r2").x);
        assert!(tree.nodes.iter().all(|n| (0.0..=1.0).contains(&n.x)));
    }
}
