//! A deterministic discrete-event network that runs real [`Node`]s and [`Client`]s.
//!
//! Every host gets a fake address (`10.a.b.c`, control port [`CONTROL_PORT`], data port
//! [`DATA_PORT`] for nodes, [`CLIENT_DATA_PORT`] for clients). Datagrams travel over
//! links with latency, jitter, loss and an up/down state, drawn from one seeded
//! `fastrand::Rng`; in-flight datagrams sit in a heap ordered by (arrival, sequence
//! number), so a run depends on nothing but the seed and the script. Every control
//! message is encoded with `ott_proto::encode` and decoded again on arrival (failures
//! are dropped and counted). A minimal data plane moves one "media token" per stream
//! and [`Sim::media_period`] from each server along the [`Event::Forwarding`] sets, so
//! tests can check who receives what and how many copies each link carries.
//!
//! The clock is virtual: [`Sim::now`] only moves when [`Sim::run_until`] or
//! [`Sim::run_for`] steps the simulation; the wall clock is read once, in [`Sim::new`], to
//! get an origin `Instant`.
//!
//! ```
//! use std::time::Duration;
//! use ott_tree::sim::{LinkParams, Sim};
//! use ott_tree::Role;
//!
//! let mut sim = Sim::new(7);
//! sim.add_node("s1", Role::Server);
//! sim.add_node("n1", Role::Pop);
//! sim.add_link("s1", "n1", LinkParams::new(Duration::from_millis(2)));
//! sim.start();
//! sim.run_for(Duration::from_secs(3));
//! assert_eq!(sim.node("n1").parent("s1"), Some("s1"));
//! ```

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ott_proto::{Message, StreamId, StreamInfo};

use crate::{Client, ClientConfig, ClientEvent, Event, Node, NodeConfig, Role};

/// Control port of every simulated host.
pub const CONTROL_PORT: u16 = 7000;
/// Data port of every simulated node.
pub const DATA_PORT: u16 = 7001;
/// Data port of every simulated client.
pub const CLIENT_DATA_PORT: u16 = 9000;

/// Properties of one simulated link (the same both ways).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// One-way latency.
    pub latency: Duration,
    /// Extra one-way delay, uniform in `[0, jitter)`, drawn per datagram.
    pub jitter: Duration,
    /// Probability that a datagram is lost, 0.0..=1.0.
    pub loss: f64,
}

impl LinkParams {
    /// A link with this latency, no jitter and no loss.
    pub fn new(latency: Duration) -> Self {
        Self {
            latency,
            jitter: Duration::ZERO,
            loss: 0.0,
        }
    }
}

#[derive(Debug)]
struct SimLink {
    params: LinkParams,
    up: bool,
}

#[derive(Debug)]
enum Machine {
    Node(Box<Node>),
    Client(Box<Client>),
}

#[derive(Debug)]
struct Host {
    ip: Ipv4Addr,
    role: Option<Role>,
    pops: Vec<String>,
    machine: Option<Machine>,
    next_timeout: Option<Instant>,
    incarnation: u64,
    catalogue: Vec<StreamInfo>,
    forwarding: BTreeMap<StreamId, Vec<SocketAddr>>,
    received: BTreeMap<StreamId, u64>,
    control_sent: u64,
    log: Vec<String>,
    selected: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Payload {
    Control(Vec<u8>),
    Media { stream: StreamId, tick: u64 },
}

#[derive(Debug, PartialEq, Eq)]
struct InFlight {
    at: Instant,
    seq: u64,
    from: SocketAddr,
    to: SocketAddr,
    payload: Payload,
}

impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Copies of one stream carried over one directed link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Copies {
    total: u64,
    last_tick: u64,
    in_last_tick: u64,
    max_per_tick: u64,
}

/// Counters of the whole simulated network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Control datagrams put on a link.
    pub control_sent: u64,
    /// Media tokens put on a link.
    pub media_sent: u64,
    /// Datagrams lost to link loss.
    pub lost: u64,
    /// Datagrams dropped because there is no link or it is down.
    pub no_route: u64,
    /// Datagrams dropped because their destination is dead or unknown.
    pub dead_dest: u64,
    /// Control messages that failed to encode or decode.
    pub codec_errors: u64,
    /// Steps run.
    pub steps: u64,
}

type Hook = Box<dyn FnMut(&Sim)>;

/// The simulated network. See the module docs.
pub struct Sim {
    epoch: Instant,
    now: Instant,
    rng: fastrand::Rng,
    seed: u64,
    hosts: BTreeMap<String, Host>,
    by_ip: BTreeMap<Ipv4Addr, String>,
    links: BTreeMap<(String, String), SimLink>,
    wire: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    started: bool,
    media_period: Duration,
    next_media: Option<Instant>,
    tick: u64,
    copies: BTreeMap<(String, String, StreamId), Copies>,
    stats: SimStats,
    hook: Option<Hook>,
    /// Most steps a single `run_until` may take before it panics.
    pub max_steps: u64,
    /// Template for node configurations (id, role, data port and seed are overwritten).
    pub node_config: NodeConfig,
    /// Template for client configurations (the seed is overwritten).
    pub client_config: ClientConfig,
    /// Parameters of the link created between a client and each of its PoPs.
    pub access_link: LinkParams,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("now", &self.now.saturating_duration_since(self.epoch))
            .field("hosts", &self.hosts.len())
            .field("links", &self.links.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn key(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

impl Sim {
    /// An empty network whose randomness all derives from `seed`.
    pub fn new(seed: u64) -> Self {
        // The only clock read of the simulator: an arbitrary origin for virtual time,
        // never read again. tidy: allow(clock)
        let epoch = Instant::now();
        Self {
            epoch,
            now: epoch,
            rng: fastrand::Rng::with_seed(seed),
            seed,
            hosts: BTreeMap::new(),
            by_ip: BTreeMap::new(),
            links: BTreeMap::new(),
            wire: BinaryHeap::new(),
            seq: 0,
            started: false,
            media_period: Duration::from_millis(100),
            next_media: None,
            tick: 0,
            copies: BTreeMap::new(),
            stats: SimStats::default(),
            hook: None,
            max_steps: 20_000_000,
            node_config: NodeConfig::new("", Role::Relay, DATA_PORT),
            client_config: ClientConfig::default(),
            access_link: LinkParams::new(Duration::from_millis(1)),
        }
    }

    /// Virtual time elapsed since the start.
    pub fn elapsed(&self) -> Duration {
        self.now.saturating_duration_since(self.epoch)
    }

    /// The current virtual instant.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Period of media tokens sent by servers (default 100 ms).
    pub fn media_period(&self) -> Duration {
        self.media_period
    }

    /// Change the period of media tokens.
    pub fn set_media_period(&mut self, d: Duration) {
        self.media_period = d.max(Duration::from_millis(1));
    }

    /// Network-wide counters.
    pub fn stats(&self) -> SimStats {
        self.stats
    }

    fn add_host(&mut self, id: &str, role: Option<Role>, pops: Vec<String>) {
        assert!(!self.hosts.contains_key(id), "duplicate host {id}");
        let i = u32::try_from(self.hosts.len() + 1).unwrap_or(u32::MAX);
        let ip = Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8);
        self.by_ip.insert(ip, id.to_owned());
        self.hosts.insert(
            id.to_owned(),
            Host {
                ip,
                role,
                pops,
                machine: None,
                next_timeout: None,
                incarnation: 1,
                catalogue: Vec::new(),
                forwarding: BTreeMap::new(),
                received: BTreeMap::new(),
                control_sent: 0,
                log: Vec::new(),
                selected: None,
            },
        );
    }

    /// Add an overlay node (before [`Sim::start`]).
    pub fn add_node(&mut self, id: &str, role: Role) {
        self.add_host(id, Some(role), Vec::new());
    }

    /// Add a client attached to `pops` through [`Sim::access_link`] links. It starts at
    /// once if the simulation is running.
    pub fn add_client(&mut self, id: &str, pops: &[&str]) {
        self.add_host(id, None, pops.iter().map(|p| (*p).to_owned()).collect());
        for p in pops {
            self.links.insert(
                key(id, p),
                SimLink {
                    params: self.access_link,
                    up: true,
                },
            );
        }
        if self.started {
            self.boot(id);
        }
    }

    /// Add a link between two hosts (before [`Sim::start`] for nodes).
    pub fn add_link(&mut self, a: &str, b: &str, params: LinkParams) {
        assert!(self.hosts.contains_key(a) && self.hosts.contains_key(b));
        self.links.insert(key(a, b), SimLink { params, up: true });
    }

    /// Change a link's parameters.
    pub fn set_link(&mut self, a: &str, b: &str, params: LinkParams) {
        if let Some(l) = self.links.get_mut(&key(a, b)) {
            l.params = params;
        }
    }

    /// Take a link down: everything sent over it is dropped.
    pub fn link_down(&mut self, a: &str, b: &str) {
        if let Some(l) = self.links.get_mut(&key(a, b)) {
            l.up = false;
        }
    }

    /// Bring a link back up.
    pub fn link_up(&mut self, a: &str, b: &str) {
        if let Some(l) = self.links.get_mut(&key(a, b)) {
            l.up = true;
        }
    }

    /// Ids of every link `(a, b)` with `a < b`, sorted.
    pub fn links(&self) -> Vec<(String, String)> {
        self.links.keys().cloned().collect()
    }

    /// Control address of a host.
    pub fn addr(&self, id: &str) -> Option<SocketAddr> {
        self.hosts
            .get(id)
            .map(|h| SocketAddr::new(IpAddr::V4(h.ip), CONTROL_PORT))
    }

    /// Set a server's catalogue (now, or at start).
    pub fn set_catalogue(&mut self, server: &str, streams: Vec<StreamInfo>) {
        let now = self.now;
        if let Some(h) = self.hosts.get_mut(server) {
            h.catalogue = streams.clone();
            if let Some(Machine::Node(n)) = &mut h.machine {
                n.set_catalogue(now, streams);
            }
        }
        self.drain(server);
    }

    /// Create every state machine at the current time.
    pub fn start(&mut self) {
        self.started = true;
        self.next_media = Some(self.now + self.media_period);
        let ids: Vec<String> = self.hosts.keys().cloned().collect();
        for id in ids {
            self.boot(&id);
        }
    }

    fn overlay_neighbours(&self, id: &str) -> Vec<(String, SocketAddr)> {
        self.links
            .keys()
            .filter_map(|(a, b)| {
                let other = if a == id {
                    b
                } else if b == id {
                    a
                } else {
                    return None;
                };
                let h = self.hosts.get(other)?;
                h.role?;
                Some((other.clone(), self.addr(other)?))
            })
            .collect()
    }

    fn boot(&mut self, id: &str) {
        let now = self.now;
        let epoch = self.epoch;
        let seed = self.seed ^ (self.hosts.keys().position(|k| k == id).unwrap_or(0) as u64);
        let neighbours = self.overlay_neighbours(id);
        let pops: Vec<(String, SocketAddr)> = match self.hosts.get(id) {
            Some(h) => h
                .pops
                .iter()
                .filter_map(|p| Some((p.clone(), self.addr(p)?)))
                .collect(),
            None => return,
        };
        let mut node_cfg = self.node_config.clone();
        let mut client_cfg = self.client_config.clone();
        let Some(h) = self.hosts.get_mut(id) else {
            return;
        };
        let machine = match h.role {
            Some(role) => {
                node_cfg.id = id.to_owned();
                node_cfg.role = role;
                node_cfg.data_port = DATA_PORT;
                node_cfg.seed = seed;
                node_cfg.incarnation = h.incarnation;
                let mut n = Node::new(node_cfg, neighbours, epoch, now);
                if role == Role::Server {
                    n.set_catalogue(now, h.catalogue.clone());
                }
                Machine::Node(Box::new(n))
            }
            None => {
                client_cfg.seed = seed;
                let mut c = Client::new(client_cfg, pops, CLIENT_DATA_PORT, epoch, now);
                if let Some(s) = &h.selected {
                    c.select_stream(now, s);
                }
                Machine::Client(Box::new(c))
            }
        };
        h.machine = Some(machine);
        h.forwarding.clear();
        self.drain(id);
    }

    /// Crash a host: it stops at once, without a word to anyone.
    pub fn kill(&mut self, id: &str) {
        if let Some(h) = self.hosts.get_mut(id) {
            h.machine = None;
            h.next_timeout = None;
            h.forwarding.clear();
        }
    }

    /// Restart a killed host with a higher incarnation and a fresh state.
    pub fn restart(&mut self, id: &str) {
        if let Some(h) = self.hosts.get_mut(id) {
            h.incarnation += 1;
        }
        self.boot(id);
    }

    /// Shut a host down cleanly (`Bye`, `Leave`), then stop it.
    pub fn shutdown(&mut self, id: &str) {
        let now = self.now;
        if let Some(h) = self.hosts.get_mut(id) {
            match &mut h.machine {
                Some(Machine::Node(n)) => n.shutdown(now),
                Some(Machine::Client(c)) => c.shutdown(now),
                None => {}
            }
        }
        self.drain(id);
        self.kill(id);
    }

    /// Make a client watch `name`.
    pub fn select_stream(&mut self, client: &str, name: &str) {
        let now = self.now;
        if let Some(h) = self.hosts.get_mut(client) {
            h.selected = Some(name.to_owned());
            if let Some(Machine::Client(c)) = &mut h.machine {
                c.select_stream(now, name);
            }
        }
        self.drain(client);
    }

    /// A running node. Panics if `id` is not a running node (a test bug).
    pub fn node(&self, id: &str) -> &Node {
        match self.hosts.get(id).and_then(|h| h.machine.as_ref()) {
            Some(Machine::Node(n)) => n,
            _ => panic!("{id} is not a running node"),
        }
    }

    /// A running client. Panics if `id` is not a running client (a test bug).
    pub fn client(&self, id: &str) -> &Client {
        match self.hosts.get(id).and_then(|h| h.machine.as_ref()) {
            Some(Machine::Client(c)) => c,
            _ => panic!("{id} is not a running client"),
        }
    }

    /// Whether `id` is running.
    pub fn is_running(&self, id: &str) -> bool {
        self.hosts.get(id).is_some_and(|h| h.machine.is_some())
    }

    /// Ids of all nodes (not clients), sorted.
    pub fn node_ids(&self) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|(_, h)| h.role.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Control datagrams sent by `id` so far.
    pub fn control_messages_sent(&self, id: &str) -> u64 {
        self.hosts.get(id).map_or(0, |h| h.control_sent)
    }

    /// Media tokens of `stream` received by host `id` (client or node).
    pub fn received(&self, id: &str, stream: StreamId) -> u64 {
        self.hosts
            .get(id)
            .and_then(|h| h.received.get(&stream).copied())
            .unwrap_or(0)
    }

    /// Media tokens of `stream` sent from `from` to `to` so far.
    pub fn media_sent(&self, from: &str, to: &str, stream: StreamId) -> u64 {
        self.copies
            .get(&(from.to_owned(), to.to_owned(), stream))
            .map_or(0, |c| c.total)
    }

    /// The largest number of copies of one media token any directed link carried.
    pub fn max_copies_per_link(&self) -> u64 {
        self.copies
            .values()
            .map(|c| c.max_per_tick)
            .max()
            .unwrap_or(0)
    }

    /// Control messages a client sent, as `"<kind> <to>"` lines (e.g. `"join n5"`).
    pub fn client_log(&self, id: &str) -> &[String] {
        self.hosts.get(id).map_or(&[], |h| &h.log)
    }

    /// Call `f` after every step of the simulation.
    pub fn on_step(&mut self, f: impl FnMut(&Self) + 'static) {
        self.hook = Some(Box::new(f));
    }

    /// Run until virtual time `t` (relative to the start).
    ///
    /// Panics, naming the step count, if more than [`Sim::max_steps`] steps are needed.
    pub fn run_until(&mut self, t: Duration) {
        let end = self.epoch + t;
        let mut steps = 0u64;
        while self.step(end) {
            steps += 1;
            assert!(
                steps <= self.max_steps,
                "simulation did not reach {t:?} after {steps} steps (now {:?})",
                self.elapsed()
            );
        }
        self.now = self.now.max(end);
    }

    /// Run for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let t = self.elapsed() + d;
        self.run_until(t);
    }

    /// One step: deliver the earliest datagram, or fire the earliest timer(s), or the media
    /// tick, if it is not after `end`. Returns false when nothing is left before `end`.
    fn step(&mut self, end: Instant) -> bool {
        let wire = self.wire.peek().map(|Reverse(f)| f.at);
        let timer = self
            .hosts
            .iter()
            .filter_map(|(id, h)| h.next_timeout.map(|t| (t, id)))
            .min()
            .map(|(t, id)| (t, id.clone()));
        let media = self.next_media;
        let next = [wire, timer.as_ref().map(|(t, _)| *t), media]
            .into_iter()
            .flatten()
            .min();
        let Some(next) = next else {
            return false;
        };
        if next > end {
            return false;
        }
        self.now = self.now.max(next);
        self.stats.steps += 1;
        if wire == Some(next) {
            if let Some(Reverse(f)) = self.wire.pop() {
                self.deliver(f);
            }
        } else if let Some((t, id)) = timer.filter(|(t, _)| *t == next) {
            let now = self.now.max(t);
            if let Some(h) = self.hosts.get_mut(&id) {
                match &mut h.machine {
                    Some(Machine::Node(n)) => n.handle_timeout(now),
                    Some(Machine::Client(c)) => c.handle_timeout(now),
                    None => {}
                }
            }
            self.drain(&id);
        } else {
            self.media_tick();
        }
        if let Some(mut hook) = self.hook.take() {
            hook(self);
            self.hook = Some(hook);
        }
        true
    }

    fn media_tick(&mut self) {
        self.tick += 1;
        self.next_media = Some(self.now + self.media_period);
        let mut sends = Vec::new();
        for (id, h) in &self.hosts {
            if h.machine.is_none() || h.role != Some(Role::Server) {
                continue;
            }
            for s in &h.catalogue {
                for to in h.forwarding.get(&s.id).into_iter().flatten() {
                    sends.push((id.clone(), *to, s.id));
                }
            }
        }
        let tick = self.tick;
        for (from, to, stream) in sends {
            self.send_media(&from, to, stream, tick);
        }
    }

    fn send_media(&mut self, from: &str, to: SocketAddr, stream: StreamId, tick: u64) {
        let Some(src) = self.hosts.get(from).map(|h| h.ip) else {
            return;
        };
        let Some(dst) = self.dest_id(to) else {
            self.stats.dead_dest += 1;
            return;
        };
        let c = self
            .copies
            .entry((from.to_owned(), dst, stream))
            .or_default();
        c.total += 1;
        if c.last_tick == tick {
            c.in_last_tick += 1;
        } else {
            c.last_tick = tick;
            c.in_last_tick = 1;
        }
        c.max_per_tick = c.max_per_tick.max(c.in_last_tick);
        self.stats.media_sent += 1;
        let from_addr = SocketAddr::new(IpAddr::V4(src), DATA_PORT);
        self.put_on_wire(from, from_addr, to, Payload::Media { stream, tick });
    }

    fn dest_id(&self, to: SocketAddr) -> Option<String> {
        match to.ip() {
            IpAddr::V4(ip) => self.by_ip.get(&ip).cloned(),
            IpAddr::V6(_) => None,
        }
    }

    fn put_on_wire(&mut self, from: &str, from_addr: SocketAddr, to: SocketAddr, p: Payload) {
        let Some(dst) = self.dest_id(to) else {
            self.stats.dead_dest += 1;
            return;
        };
        let Some(link) = self.links.get(&key(from, &dst)) else {
            self.stats.no_route += 1;
            return;
        };
        if !link.up {
            self.stats.no_route += 1;
            return;
        }
        let params = link.params;
        if params.loss > 0.0 && self.rng.f64() < params.loss {
            self.stats.lost += 1;
            return;
        }
        let jitter = if params.jitter.is_zero() {
            Duration::ZERO
        } else {
            params.jitter.mul_f64(self.rng.f64())
        };
        self.seq += 1;
        self.wire.push(Reverse(InFlight {
            at: self.now + params.latency + jitter,
            seq: self.seq,
            from: from_addr,
            to,
            payload: p,
        }));
    }

    fn deliver(&mut self, f: InFlight) {
        let now = self.now;
        let Some(id) = self.dest_id(f.to) else {
            self.stats.dead_dest += 1;
            return;
        };
        match f.payload {
            Payload::Control(bytes) => {
                let Ok(msg) = ott_proto::decode(&bytes) else {
                    self.stats.codec_errors += 1;
                    return;
                };
                let Some(h) = self.hosts.get_mut(&id) else {
                    return;
                };
                match &mut h.machine {
                    Some(Machine::Node(n)) => n.handle(now, f.from, msg),
                    Some(Machine::Client(c)) => c.handle(now, f.from, msg),
                    None => {
                        self.stats.dead_dest += 1;
                        return;
                    }
                }
                self.drain(&id);
            }
            Payload::Media { stream, tick } => {
                let Some(h) = self.hosts.get_mut(&id) else {
                    return;
                };
                if h.machine.is_none() {
                    self.stats.dead_dest += 1;
                    return;
                }
                *h.received.entry(stream).or_default() += 1;
                let fwd = h.forwarding.get(&stream).cloned().unwrap_or_default();
                for to in fwd {
                    self.send_media(&id, to, stream, tick);
                }
            }
        }
    }

    /// Drain a host's outputs onto the wire (drain rule), then cache its next timeout.
    fn drain(&mut self, id: &str) {
        let mut out: Vec<(SocketAddr, Message)> = Vec::new();
        let mut fwd: Vec<(StreamId, Vec<SocketAddr>)> = Vec::new();
        let mut log: Vec<String> = Vec::new();
        let Some(h) = self.hosts.get_mut(id) else {
            return;
        };
        let pop_name = |a: SocketAddr, by_ip: &BTreeMap<Ipv4Addr, String>| match a.ip() {
            IpAddr::V4(ip) => by_ip.get(&ip).cloned().unwrap_or_else(|| a.to_string()),
            IpAddr::V6(_) => a.to_string(),
        };
        match &mut h.machine {
            Some(Machine::Node(n)) => {
                while let Some(t) = n.poll_transmit() {
                    out.push((t.to, t.msg));
                }
                while let Some(ev) = n.poll_event() {
                    if let Event::Forwarding { stream, children } = ev {
                        fwd.push((stream, children));
                    }
                }
                h.next_timeout = n.poll_timeout();
            }
            Some(Machine::Client(c)) => {
                while let Some(t) = c.poll_transmit() {
                    match &t.msg {
                        Message::Join { .. } | Message::Leave { .. } => {
                            log.push(format!("{} {}", t.msg.kind(), pop_name(t.to, &self.by_ip)))
                        }
                        _ => {}
                    }
                    out.push((t.to, t.msg));
                }
                while let Some(ev) = c.poll_event() {
                    if let ClientEvent::Watching(s) = &ev {
                        log.push(format!("watching {}", s.name));
                    } else if let ClientEvent::PopChanged { new, .. } = &ev {
                        log.push(format!("pop {new}"));
                    }
                }
                h.next_timeout = c.poll_timeout();
            }
            None => {
                h.next_timeout = None;
                return;
            }
        }
        for (stream, children) in fwd {
            if children.is_empty() {
                h.forwarding.remove(&stream);
            } else {
                h.forwarding.insert(stream, children);
            }
        }
        h.log.extend(log);
        let ip = h.ip;
        h.control_sent += out.len() as u64;
        let from_addr = SocketAddr::new(IpAddr::V4(ip), CONTROL_PORT);
        for (to, msg) in out {
            let Ok(bytes) = ott_proto::encode(&msg) else {
                self.stats.codec_errors += 1;
                continue;
            };
            self.stats.control_sent += 1;
            self.put_on_wire(id, from_addr, to, Payload::Control(bytes));
        }
    }

    /// Check that no server's tree and no stream's subscription chain has a cycle among
    /// the running nodes, and every node's own invariants.
    pub fn check_loop_free(&self) -> Result<(), String> {
        let nodes: BTreeMap<&str, &Node> = self
            .hosts
            .iter()
            .filter_map(|(id, h)| match &h.machine {
                Some(Machine::Node(n)) => Some((id.as_str(), n.as_ref())),
                _ => None,
            })
            .collect();
        let mut servers: Vec<String> = nodes.values().flat_map(|n| n.servers()).collect();
        servers.sort();
        servers.dedup();
        for n in nodes.values() {
            n.check_invariants()?;
        }
        for s in &servers {
            for start in nodes.keys() {
                let mut seen = vec![*start];
                let mut cur = *start;
                while let Some(p) = nodes.get(cur).and_then(|n| n.parent(s)) {
                    if seen.contains(&p) {
                        seen.push(p);
                        return Err(format!("loop towards {s}: {}", seen.join(" -> ")));
                    }
                    seen.push(p);
                    cur = p;
                }
            }
        }
        let mut streams: Vec<StreamId> = self
            .hosts
            .values()
            .flat_map(|h| h.catalogue.iter().map(|s| s.id))
            .collect();
        streams.sort_unstable();
        streams.dedup();
        for st in streams {
            for start in nodes.keys() {
                let mut seen = vec![*start];
                let mut cur = *start;
                while let Some(p) = nodes.get(cur).and_then(|n| n.upstream(st)) {
                    if seen.contains(&p) {
                        seen.push(p);
                        return Err(format!(
                            "subscription loop for {st:#x}: {}",
                            seen.join(" -> ")
                        ));
                    }
                    seen.push(p);
                    cur = p;
                }
            }
        }
        Ok(())
    }

    /// The tree as stable, sorted text: one line per running host, e.g.
    /// `n5 parent=n9 hops=3 latency=7.0ms` or `c1 pop=n5`.
    pub fn dump_tree(&self) -> String {
        let mut out = String::new();
        for (id, h) in &self.hosts {
            match &h.machine {
                Some(Machine::Node(n)) => {
                    let st = n.status();
                    let _ = writeln!(
                        out,
                        "{id} parent={} hops={} latency={}",
                        st.parent.as_deref().unwrap_or("-"),
                        st.hops.map_or("-".to_owned(), |h| h.to_string()),
                        st.latency_ms
                            .map_or("-".to_owned(), |l| format!("{l:.1}ms"))
                    );
                }
                Some(Machine::Client(c)) => {
                    let _ = writeln!(
                        out,
                        "{id} pop={} stream={}",
                        c.pop().unwrap_or("-"),
                        c.stream().map_or("-", |s| s.name.as_str())
                    );
                }
                None => {
                    let _ = writeln!(out, "{id} down");
                }
            }
        }
        out
    }
}
