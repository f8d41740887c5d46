//! The bootstrapper service: answers requests from a topology.
//!
//! # Bounds on what a connection can hold
//! - Each request must arrive whole within the I/O timeout (5 s), counted from the
//!   accept or the previous answer, however it is sliced (a deadline, not a timeout per
//!   read); each answer must be written within it too. At most
//!   [`MAX_REQUESTS_PER_CONNECTION`] requests per connection.
//! - At most `max_connections` (256) connections open, `max_per_addr` (64) from one
//!   source IP address. A new connection past a cap closes the oldest open one (of its
//!   address; for the global cap, of the address holding the most), which the real
//!   client of it (if it was one) sees as an I/O error and retries: slow or idle
//!   connections cannot lock real nodes out, since a real node's exchange takes a
//!   millisecond. Only when the evicted connections' threads have not finished yet
//!   (twice the cap open) is a new connection refused ("busy").
//! - Every cap that bites is counted ([`Service::stats`]) and logged once per burst;
//!   ids from the network are logged truncated and escaped ([`ott_proto::untrusted`]);
//!   a refusal of an unknown id lists no ids.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use ott_overlay::{AddressPlan, Role, Topology, CONTROL_PORT, DATA_PORT};
use ott_proto::auth::OverlayKey;
use ott_proto::untrusted;
use tracing::{debug, info, warn};

use crate::keyed::{check_request, seal_response, AnyRequest};
use crate::{
    read_frame_body, write_frame, Assignment, BootstrapError, Peer, Request, Response,
    ANONYMOUS_CLIENT_ID,
};

/// Default deadline for each request to arrive whole, and for each answer to be written.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on connections open at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default bound on connections open at once from one source IP address.
pub const DEFAULT_MAX_PER_ADDR: usize = 64;
/// Requests one connection may send; then it is closed.
pub const MAX_REQUESTS_PER_CONNECTION: usize = 16;
/// How long the accept loop sleeps when no connection is waiting.
const ACCEPT_POLL: Duration = Duration::from_millis(10);
/// Caps that bite are logged at most once per this interval, with how often they bit.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The bootstrapper: a topology, an address plan and connection limits.
#[derive(Debug)]
pub struct Service {
    topology: Topology,
    plan: AddressPlan,
    io_timeout: Duration,
    max_connections: usize,
    max_per_addr: usize,
    conns: Mutex<Conns>,
    counters: Counters,
    bursts: Mutex<Bursts>,
    /// The overlay key: node requests must be tagged with it (see [`crate::keyed`]).
    key: Option<OverlayKey>,
}

/// Counters of a running bootstrapper ([`Service::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Requests answered with an assignment.
    pub assigned: u64,
    /// Requests answered with a refusal (unknown id, wrong role, malformed, too long).
    pub refused: u64,
    /// Requests that were not a well-formed frame of a request (counted in `refused` too).
    pub malformed: u64,
    /// Connections closed because a request did not arrive whole, or an answer could
    /// not be written, by the deadline.
    pub timed_out: u64,
    /// Connections closed to make room for a new one (a cap was full).
    pub evicted: u64,
    /// Connections refused at once: twice the cap still open, evicted ones finishing.
    pub busy: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    assigned: AtomicU64,
    refused: AtomicU64,
    malformed: AtomicU64,
    timed_out: AtomicU64,
    evicted: AtomicU64,
    busy: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Counts how often something happened since it was last logged.
#[derive(Debug, Default)]
struct Burst {
    last: Option<Instant>,
    count: u64,
}

impl Burst {
    /// Note one more; `Some(n)` when it is time to log `n` of them.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

#[derive(Debug, Default)]
struct Bursts {
    evicted: Burst,
    timed_out: Burst,
    busy: Burst,
    refused: Burst,
}

/// An open connection: a handle on its socket, to close it when it is evicted.
#[derive(Debug)]
struct Open {
    ip: IpAddr,
    since: Instant,
    handle: TcpStream,
    evicted: bool,
}

/// The open connections, by source address.
#[derive(Debug, Default)]
struct Conns {
    next_id: u64,
    open: HashMap<u64, Open>,
    /// Connections holding a slot (not evicted), per address and in all.
    per_ip: HashMap<IpAddr, usize>,
    held: usize,
}

impl Conns {
    /// Make room for a connection from `ip` and register it: its id and how many were
    /// evicted, or `None` when it must be refused.
    fn admit(
        &mut self,
        ip: IpAddr,
        handle: TcpStream,
        now: Instant,
        max: usize,
        per_addr: usize,
    ) -> (Option<u64>, usize) {
        // Threads of evicted connections end at once; never more than this open.
        if self.open.len() >= 2 * max {
            return (None, 0);
        }
        let mut evicted = 0;
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= per_addr && self.evict(Some(ip)) {
            evicted += 1;
        }
        if self.held >= max && self.evict(None) {
            evicted += 1;
        }
        self.next_id += 1;
        let id = self.next_id;
        self.open.insert(
            id,
            Open {
                ip,
                since: now,
                handle,
                evicted: false,
            },
        );
        self.held += 1;
        *self.per_ip.entry(ip).or_default() += 1;
        (Some(id), evicted)
    }

    /// Close the oldest connection of `ip`, or (`None`) of the address holding the most.
    fn evict(&mut self, ip: Option<IpAddr>) -> bool {
        let per_ip = &self.per_ip;
        let weight = |o: &Open| per_ip.get(&o.ip).copied().unwrap_or(0);
        let heaviest = self
            .open
            .values()
            .filter(|o| !o.evicted)
            .map(weight)
            .max()
            .unwrap_or(0);
        let victim = self
            .open
            .iter()
            .filter(|(_, o)| !o.evicted)
            .filter(|(_, o)| match ip {
                Some(ip) => o.ip == ip,
                None => weight(o) == heaviest,
            })
            .min_by_key(|(id, o)| (o.since, **id))
            .map(|(id, _)| *id);
        let Some(o) = victim.and_then(|id| self.open.get_mut(&id)) else {
            return false;
        };
        // Its thread's read or write fails at once, and the thread ends.
        let _ = o.handle.shutdown(Shutdown::Both);
        o.evicted = true;
        let ip = o.ip;
        self.release(ip);
        true
    }

    fn release(&mut self, ip: IpAddr) {
        self.held = self.held.saturating_sub(1);
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    fn finish(&mut self, id: u64) {
        if let Some(o) = self.open.remove(&id) {
            if !o.evicted {
                self.release(o.ip);
            }
        }
    }
}

/// Unregisters a connection when its thread ends, however it ends.
struct OpenGuard<'a> {
    service: &'a Service,
    id: u64,
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.service.conns().finish(self.id);
    }
}

/// Reads and writes a socket until a deadline for all the calls together.
struct Deadline<'a> {
    stream: &'a TcpStream,
    at: Instant,
}

impl Deadline<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(ErrorKind::TimedOut, "deadline passed"));
        }
        Ok(left)
    }
}

fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == ErrorKind::WouldBlock {
        io::Error::new(ErrorKind::TimedOut, "deadline passed")
    } else {
        e
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.stream).read(buf).map_err(timed_out)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.stream).write(buf).map_err(timed_out)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&mut &*self.stream).flush()
    }
}

impl Service {
    /// A service answering from `topology` with addresses from `plan`, with the default
    /// limits ([`DEFAULT_IO_TIMEOUT`], [`DEFAULT_MAX_CONNECTIONS`],
    /// [`DEFAULT_MAX_PER_ADDR`]).
    pub fn new(topology: Topology, plan: AddressPlan) -> Self {
        Self {
            topology,
            plan,
            io_timeout: DEFAULT_IO_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_per_addr: DEFAULT_MAX_PER_ADDR,
            conns: Mutex::new(Conns::default()),
            counters: Counters::default(),
            bursts: Mutex::new(Bursts::default()),
            key: None,
        }
    }

    /// Requires node requests to be tagged with `key`, and tags the answers to them;
    /// clients (who hold no key) are still answered, with the PoPs only (see
    /// [`crate::keyed`]).
    pub fn with_key(mut self, key: OverlayKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Sets the deadline for each request to arrive whole and each answer to be written
    /// (a zero duration is taken as one millisecond).
    pub fn with_io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Sets how many connections may be open at once (at least one); a new one past it
    /// closes the oldest of the address holding the most.
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// Sets how many connections may be open at once from one source IP address (at
    /// least one); a new one past it closes that address's oldest.
    pub fn with_max_per_addr(mut self, max: usize) -> Self {
        self.max_per_addr = max.max(1);
        self
    }

    /// The counters so far.
    pub fn stats(&self) -> ServiceStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServiceStats {
            accepted: g(&c.accepted),
            assigned: g(&c.assigned),
            refused: g(&c.refused),
            malformed: g(&c.malformed),
            timed_out: g(&c.timed_out),
            evicted: g(&c.evicted),
            busy: g(&c.busy),
        }
    }

    fn conns(&self) -> MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Note one more of a burst; `Some(n)` when it is time to log `n`.
    fn burst(&self, pick: impl FnOnce(&mut Bursts) -> &mut Burst) -> Option<u64> {
        let mut b = self.bursts.lock().unwrap_or_else(|e| e.into_inner());
        pick(&mut b).note(Instant::now())
    }

    /// The topology served.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The address plan served.
    pub fn plan(&self) -> AddressPlan {
        self.plan
    }

    /// Answers one request; pure (no I/O).
    ///
    /// A [`Request::Node`] is accepted for servers, relays and pops; a
    /// [`Request::Client`] for client nodes, or with no id at all (an anonymous client).
    /// Anything else, and an unknown id, gets a [`Response::Refused`] that says why.
    pub fn answer(&self, req: &Request) -> Response {
        match self.try_answer(req) {
            Ok(a) => Response::Assigned(a),
            Err(reason) => Response::Refused { reason },
        }
    }

    fn try_answer(&self, req: &Request) -> Result<Assignment, String> {
        let t = &self.topology;
        match req {
            Request::Node { id } => {
                let node = t.node(id).ok_or_else(|| self.unknown_id(id))?;
                match node.role {
                    Role::Router => {
                        return Err(format!(
                            "\"{id}\" is a router: routers run no overlay process"
                        ))
                    }
                    Role::Client => {
                        return Err(format!(
                            "\"{id}\" is a client: start it with ott-client, not as a node"
                        ))
                    }
                    Role::Server | Role::Relay | Role::Pop => {}
                }
                let ip = match self.plan {
                    AddressPlan::Loopback => t
                        .node_ip(id, self.plan)
                        .ok_or_else(|| format!("node \"{id}\" has no loopback address"))?,
                    AddressPlan::Links => Ipv4Addr::UNSPECIFIED,
                };
                let neighbours = t
                    .overlay_neighbours(id)
                    .iter()
                    .filter_map(|n| self.peer(n, id))
                    .collect();
                Ok(Assignment {
                    id: id.clone(),
                    role: node.role,
                    bind_ctrl: SocketAddr::new(IpAddr::V4(ip), CONTROL_PORT),
                    bind_data: SocketAddr::new(IpAddr::V4(ip), DATA_PORT),
                    addresses: self.own_addresses(id),
                    neighbours,
                    pops: self.pops_seen_from(id),
                    topology: t.name.clone(),
                })
            }
            Request::Client { id: Some(id) } => {
                let node = t.node(id).ok_or_else(|| self.unknown_id(id))?;
                if node.role != Role::Client {
                    return Err(format!(
                        "\"{id}\" is a {}, not a client: start it with the program for its role",
                        node.role
                    ));
                }
                let ip = match self.plan {
                    AddressPlan::Loopback => t
                        .node_ip(id, self.plan)
                        .ok_or_else(|| format!("client \"{id}\" has no loopback address"))?,
                    AddressPlan::Links => Ipv4Addr::UNSPECIFIED,
                };
                Ok(self.client_assignment(id, ip))
            }
            Request::Client { id: None } => {
                let ip = match self.plan {
                    AddressPlan::Loopback => Ipv4Addr::LOCALHOST,
                    AddressPlan::Links => Ipv4Addr::UNSPECIFIED,
                };
                Ok(self.client_assignment(ANONYMOUS_CLIENT_ID, ip))
            }
        }
    }

    fn client_assignment(&self, id: &str, ip: Ipv4Addr) -> Assignment {
        let bind = SocketAddr::new(IpAddr::V4(ip), 0);
        Assignment {
            id: id.to_owned(),
            role: Role::Client,
            bind_ctrl: bind,
            bind_data: bind,
            addresses: self.own_addresses(id),
            neighbours: Vec::new(),
            pops: self.pops_seen_from(id),
            topology: self.topology.name.clone(),
        }
    }

    fn pops_seen_from(&self, viewer: &str) -> Vec<Peer> {
        self.topology
            .pops()
            .iter()
            .filter_map(|p| self.peer(&p.id, viewer))
            .collect()
    }

    /// Every address of `id` in the served plan (empty for an unknown id).
    fn own_addresses(&self, id: &str) -> Vec<IpAddr> {
        self.topology
            .addresses(id, self.plan)
            .into_iter()
            .map(IpAddr::V4)
            .collect()
    }

    /// `target` as `viewer` should address it: its address on the way from `viewer`
    /// (see [`Topology::ip_seen_from`]) and every address it has.
    fn peer(&self, target: &str, viewer: &str) -> Option<Peer> {
        let e = self.topology.endpoint_seen_from(target, viewer, self.plan);
        if e.is_none() {
            warn!(target, viewer, plan = %self.plan, "no address for node, left out");
        }
        e.map(|e| Peer {
            id: e.id,
            ctrl: e.ctrl,
            data: e.data,
            addrs: e.addresses.into_iter().map(IpAddr::V4).collect(),
        })
    }

    /// The refusal of an id the topology does not have. It lists no ids: whoever asks
    /// with an unknown id learns nothing about the overlay.
    fn unknown_id(&self, id: &str) -> String {
        format!(
            "unknown node id \"{}\" in topology {}",
            untrusted(id),
            self.topology.name
        )
    }

    /// Serves requests on `listener` until `stop` is set.
    ///
    /// Each connection gets its own thread, and may send up to
    /// [`MAX_REQUESTS_PER_CONNECTION`] requests, each within the I/O timeout; malformed
    /// or oversized frames get a [`Response::Refused`] and the connection is closed.
    /// The connection caps are in the module documentation. Checks `stop` at least every
    /// 10 ms; connection threads still running when it returns end by themselves within
    /// the I/O timeout.
    pub fn serve(self: Arc<Self>, listener: TcpListener, stop: Arc<AtomicBool>) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        info!(
            addr = %listener
                .local_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string()),
            topology = %self.topology.name,
            plan = %self.plan,
            max_connections = self.max_connections,
            max_per_addr = self.max_per_addr,
            "bootstrapper listening"
        );
        while !stop.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. out of file descriptors, or a connection reset before accept:
                    // keep serving.
                    warn!(error = %e, "accept failed");
                    thread::sleep(ACCEPT_POLL);
                }
            }
        }
        info!("bootstrapper stopped");
        Ok(())
    }

    /// Registers an accepted connection (making room under the caps) and hands it to a
    /// thread, or refuses it when even evicting cannot make room.
    fn admit(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        bump(&self.counters.accepted);
        let handle = match stream.try_clone() {
            Ok(h) => h,
            Err(e) => {
                debug!(%peer, error = %e, "cannot register a connection");
                return;
            }
        };
        let (id, evicted) = self.conns().admit(
            peer.ip(),
            handle,
            Instant::now(),
            self.max_connections,
            self.max_per_addr,
        );
        for _ in 0..evicted {
            bump(&self.counters.evicted);
            if let Some(n) = self.burst(|b| &mut b.evicted) {
                warn!(%peer, evicted = n, max_connections = self.max_connections,
                    max_per_addr = self.max_per_addr,
                    "connection cap reached: oldest connections closed to make room");
            }
        }
        let Some(id) = id else {
            bump(&self.counters.busy);
            if let Some(n) = self.burst(|b| &mut b.busy) {
                warn!(%peer, refused = n, "too many connections still closing, refusing");
            }
            let reason = format!(
                "{}: too many connections, retry later",
                crate::client::BUSY_REASON
            );
            // Best effort, with a short timeout: the accept loop must not stall.
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let mut stream = stream;
            let _ = write_frame(&mut stream, &Response::Refused { reason });
            let _ = stream.shutdown(Shutdown::Both);
            return;
        };
        let service = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name("bootstrap-conn".into())
            .spawn(move || {
                let _guard = OpenGuard {
                    service: &service,
                    id,
                };
                service.handle_connection(stream, peer);
            });
        if let Err(e) = spawned {
            // The closure (and its guard) never ran: unregister ourselves.
            self.conns().finish(id);
            warn!(%peer, error = %e, "cannot spawn a connection thread");
        }
    }

    /// Serves one connection until the peer closes it, misses a deadline, misbehaves or
    /// has sent [`MAX_REQUESTS_PER_CONNECTION`] requests.
    fn handle_connection(&self, stream: TcpStream, peer: SocketAddr) {
        if let Err(e) = stream.set_nonblocking(false) {
            debug!(%peer, error = %e, "cannot set up connection");
            return;
        }
        let _ = stream.set_nodelay(true);
        for _ in 0..MAX_REQUESTS_PER_CONNECTION {
            let mut io = Deadline {
                stream: &stream,
                at: Instant::now() + self.io_timeout,
            };
            let frame = match read_frame_body(&mut io).and_then(|b| AnyRequest::decode(&b)) {
                Ok(frame) => frame,
                Err(BootstrapError::Io(e)) => {
                    self.io_ended(peer, &e, "request");
                    return;
                }
                Err(e) => {
                    bump(&self.counters.malformed);
                    bump(&self.counters.refused);
                    // The decoder's message may quote what was sent.
                    let reason = untrusted(&e.to_string()).to_string();
                    if let Some(n) = self.burst(|b| &mut b.refused) {
                        info!(%peer, error = %reason, since_last_logged = n, "bad request, closing");
                    }
                    let _ = write_frame(&mut io, &Response::Refused { reason });
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            };
            let (req, nonce) = match check_request(self.key.as_ref(), frame) {
                Ok(c) => (c.request, c.nonce),
                Err(reason) => {
                    bump(&self.counters.refused);
                    if let Some(n) = self.burst(|b| &mut b.refused) {
                        info!(%peer, %reason, since_last_logged = n, "request refused by the key check");
                    }
                    let _ = write_frame(&mut io, &Response::Refused { reason });
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            };
            let resp = self.answer(&req);
            let (kind, id) = match &req {
                Request::Node { id } => ("node", Some(id.as_str())),
                Request::Client { id } => ("client", id.as_deref()),
            };
            let id = untrusted(id.unwrap_or(ANONYMOUS_CLIENT_ID));
            match &resp {
                Response::Assigned(a) => {
                    bump(&self.counters.assigned);
                    info!(%peer, id = %a.id, role = %a.role,
                        neighbours = a.neighbours.len(), "assigned");
                }
                Response::Refused { reason } => {
                    bump(&self.counters.refused);
                    if let Some(n) = self.burst(|b| &mut b.refused) {
                        info!(%peer, kind, %id, %reason, since_last_logged = n, "refused");
                    }
                }
            }
            let sealed = match seal_response(self.key.as_ref(), nonce.as_ref(), resp) {
                Ok(sealed) => sealed,
                Err(e) => {
                    warn!(%peer, error = %e, "cannot encode the answer");
                    return;
                }
            };
            let mut io = Deadline {
                stream: &stream,
                at: Instant::now() + self.io_timeout,
            };
            match write_frame(&mut io, &sealed) {
                Ok(()) => {}
                Err(BootstrapError::TooLong(n)) => {
                    warn!(%peer, bytes = n, "assignment too large to send");
                    let reason = format!("assignment too large to send ({n} bytes)");
                    let _ = write_frame(&mut io, &Response::Refused { reason });
                    return;
                }
                Err(BootstrapError::Io(e)) => {
                    self.io_ended(peer, &e, "answer");
                    return;
                }
                Err(e) => {
                    debug!(%peer, error = %e, "cannot answer");
                    return;
                }
            }
        }
        debug!(%peer, max = MAX_REQUESTS_PER_CONNECTION, "request limit reached, closing");
    }

    /// A connection ended on an I/O error: count and log a missed deadline.
    fn io_ended(&self, peer: SocketAddr, e: &io::Error, what: &str) {
        match e.kind() {
            ErrorKind::TimedOut => {
                bump(&self.counters.timed_out);
                if let Some(n) = self.burst(|b| &mut b.timed_out) {
                    info!(%peer, timed_out = n, deadline_ms = self.io_timeout.as_millis() as u64,
                        "{what} not complete by the deadline, closing");
                }
            }
            ErrorKind::UnexpectedEof => {}
            _ => debug!(%peer, error = %e, "connection ended"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPO: &str = r#"
name = "tiny"
bootstrapper = "s1"
[[node]]
id = "s1"
role = "server"
[[node]]
id = "r1"
role = "relay"
[[node]]
id = "p1"
role = "pop"
[[node]]
id = "p2"
role = "pop"
[[node]]
id = "g1"
role = "router"
[[node]]
id = "c1"
role = "client"
[[link]]
ends = ["s1", "r1"]
[[link]]
ends = ["r1", "p1"]
[[link]]
ends = ["r1", "p2"]
[[link]]
ends = ["p1", "g1"]
[[link]]
ends = ["g1", "c1"]
"#;

    fn service(plan: AddressPlan) -> Service {
        Service::new(Topology::parse(TOPO, "tiny.toml").expect("valid"), plan)
    }

    fn assigned(resp: Response) -> Assignment {
        match resp {
            Response::Assigned(a) => a,
            Response::Refused { reason } => panic!("refused: {reason}"),
        }
    }

    fn refused(resp: Response) -> String {
        match resp {
            Response::Assigned(a) => panic!("assigned: {a:?}"),
            Response::Refused { reason } => reason,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("literal address")
    }

    #[test]
    fn relay_in_loopback_plan() {
        let a = assigned(service(AddressPlan::Loopback).answer(&Request::Node { id: "r1".into() }));
        assert_eq!(a.id, "r1");
        assert_eq!(a.role, Role::Relay);
        assert_eq!(a.bind_ctrl, addr("127.1.0.2:7000"));
        assert_eq!(a.bind_data, addr("127.1.0.2:7001"));
        let ids: Vec<&str> = a.neighbours.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["p1", "p2", "s1"]);
        assert_eq!(a.neighbours[2].ctrl, addr("127.1.0.1:7000"));
        assert_eq!(a.neighbours[2].data, addr("127.1.0.1:7001"));
        let pops: Vec<&str> = a.pops.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(pops, ["p1", "p2"]);
        assert_eq!(a.topology, "tiny");
    }

    #[test]
    fn pop_in_links_plan_sees_neighbours_on_shared_links() {
        let a = assigned(service(AddressPlan::Links).answer(&Request::Node { id: "p1".into() }));
        assert_eq!(a.role, Role::Pop);
        assert_eq!(a.bind_ctrl, addr("0.0.0.0:7000"));
        assert_eq!(a.bind_data, addr("0.0.0.0:7001"));
        assert_eq!(a.neighbours.len(), 1);
        // r1 is .1 on link 1 (r1 - p1).
        assert_eq!(a.neighbours[0].ctrl, addr("10.0.1.1:7000"));
        // ... and has three addresses, one per link.
        let ips: Vec<IpAddr> = ["10.0.0.2", "10.0.1.1", "10.0.2.1"]
            .iter()
            .map(|s| s.parse().expect("literal"))
            .collect();
        assert_eq!(a.neighbours[0].addrs, ips);
        let table = a.neighbours[0].control_addrs();
        assert_eq!(table.preferred, addr("10.0.1.1:7000"));
        assert!(table.owns(addr("10.0.2.1:7000")));
        // p1's own addresses: its link to r1, then its link to g1.
        let own: Vec<IpAddr> = ["10.0.1.2", "10.0.3.1"]
            .iter()
            .map(|s| s.parse().expect("literal"))
            .collect();
        assert_eq!(a.addresses, own);
    }

    #[test]
    fn a_client_is_given_each_pops_address_on_its_way() {
        let links = service(AddressPlan::Links);
        let a = assigned(links.answer(&Request::Client {
            id: Some("c1".into()),
        }));
        // c1 - g1 - p1: p1's address on its link to g1 (link 3), not the one it is known
        // by (its first link, to r1); with every address of p1.
        assert_eq!(a.pops[0].ctrl, addr("10.0.3.1:7000"));
        assert_eq!(a.pops[0].data, addr("10.0.3.1:7001"));
        let ips: Vec<IpAddr> = ["10.0.1.2", "10.0.3.1"]
            .iter()
            .map(|s| s.parse().expect("literal"))
            .collect();
        assert_eq!(a.pops[0].addrs, ips);
        // p2 is reached through p1 and r1: its address facing r1.
        assert_eq!(a.pops[1].ctrl, addr("10.0.2.2:7000"));
        assert_eq!(a.addresses, vec![IpAddr::from([10, 0, 4, 2])]);
    }

    #[test]
    fn clients() {
        let s = service(AddressPlan::Loopback);
        let a = assigned(s.answer(&Request::Client {
            id: Some("c1".into()),
        }));
        assert_eq!((a.id.as_str(), a.role), ("c1", Role::Client));
        assert_eq!(a.bind_ctrl, addr("127.1.0.6:0"));
        assert_eq!(a.bind_data, a.bind_ctrl);
        assert!(a.neighbours.is_empty());
        assert_eq!(a.pops.len(), 2);
        let a = assigned(s.answer(&Request::Client { id: None }));
        assert_eq!(a.id, ANONYMOUS_CLIENT_ID);
        assert_eq!(a.bind_ctrl, addr("127.0.0.1:0"));
        assert!(a.addresses.is_empty());
        assert_eq!(a.pops[0].ctrl, addr("127.1.0.3:7000"));
        let links = service(AddressPlan::Links);
        let a = assigned(links.answer(&Request::Client { id: None }));
        assert_eq!(a.bind_ctrl, addr("0.0.0.0:0"));
        // An anonymous client gets p1's access side, its link to router g1 (index 3),
        // and p2's first address (it has no access link).
        assert_eq!(a.pops[0].ctrl, addr("10.0.3.1:7000"));
        assert_eq!(a.pops[1].ctrl, addr("10.0.2.2:7000"));
    }

    #[test]
    fn sparse_overlay_neighbours_are_given_the_address_on_the_path() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../topologies/sparse.toml");
        let t = Topology::load(&path).expect("sparse loads");
        let s = Service::new(t.clone(), AddressPlan::Links);
        for n in t.nodes.iter().filter(|n| n.role.is_overlay()) {
            let a = assigned(s.answer(&Request::Node { id: n.id.clone() }));
            assert!(!a.neighbours.is_empty(), "{}", n.id);
            for p in &a.neighbours {
                // Overlay nodes of sparse.toml hang off one router each: their only
                // address is the one on every path.
                assert_eq!(p.addrs, vec![p.ctrl.ip()], "{} -> {}", n.id, p.id);
                assert_eq!(
                    Some(p.ctrl.ip()),
                    t.ip_seen_from(&p.id, &n.id, AddressPlan::Links)
                        .map(IpAddr::V4)
                );
            }
        }
    }

    #[test]
    fn refusals_say_why() {
        let s = service(AddressPlan::Loopback);
        assert_eq!(
            refused(s.answer(&Request::Node { id: "x9".into() })),
            "unknown node id \"x9\" in topology tiny"
        );
        assert_eq!(
            refused(s.answer(&Request::Client {
                id: Some("x9".into())
            })),
            "unknown node id \"x9\" in topology tiny"
        );
        assert!(refused(s.answer(&Request::Node { id: "g1".into() })).contains("router"));
        assert!(refused(s.answer(&Request::Node { id: "c1".into() })).contains("client"));
        for id in ["s1", "r1", "p1", "g1"] {
            let reason = refused(s.answer(&Request::Client {
                id: Some(id.into()),
            }));
            assert!(reason.contains("not a client"), "{reason}");
        }
    }

    #[test]
    fn an_unknown_id_learns_no_ids_and_is_cut_short() {
        let s = service(AddressPlan::Loopback);
        let long = format!("{}\n\u{1b}[2J", "z".repeat(64 * 1024));
        let reason = refused(s.answer(&Request::Node { id: long }));
        for known in ["s1", "r1", "p1", "p2", "c1"] {
            assert!(!reason.contains(known), "{reason}");
        }
        assert!(reason.len() < 200, "{} bytes", reason.len());
        assert!(
            !reason.contains('\n') && !reason.contains('\u{1b}'),
            "{reason}"
        );
        assert!(reason.contains("...(+"), "{reason}");
    }

    #[test]
    fn the_oldest_connection_of_the_heaviest_address_makes_room() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let to = listener.local_addr().expect("addr");
        let handle = || TcpStream::connect(to).expect("connect");
        let (a, b, c) = (
            IpAddr::from([127, 0, 0, 2]),
            IpAddr::from([127, 0, 0, 3]),
            IpAddr::from([127, 0, 0, 4]),
        );
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut conns = Conns::default();
        let (max, per_addr) = (3, 2);
        let admit = |conns: &mut Conns, ip, ms| conns.admit(ip, handle(), at(ms), max, per_addr);
        let (Some(b1), 0) = admit(&mut conns, b, 0) else {
            panic!("room")
        };
        let (Some(a1), 0) = admit(&mut conns, a, 1) else {
            panic!("room")
        };
        let (Some(a2), 0) = admit(&mut conns, a, 2) else {
            panic!("room")
        };
        // a's third: a's oldest goes, not b's older one.
        let (Some(_a3), 1) = admit(&mut conns, a, 3) else {
            panic!("evicts")
        };
        assert!(conns.open[&a1].evicted && !conns.open[&b1].evicted);
        // c's first, at the global cap: the oldest of a (holding the most) goes.
        let (Some(_c1), 1) = admit(&mut conns, c, 4) else {
            panic!("evicts")
        };
        assert!(conns.open[&a2].evicted && !conns.open[&b1].evicted);
        assert_eq!((conns.held, conns.per_ip[&a]), (3, 1));
        // Twice the cap open (evicted threads not finished): refused.
        let _ = admit(&mut conns, b, 5);
        assert_eq!(conns.open.len(), 6);
        assert!(admit(&mut conns, b, 6).0.is_none());
        let ids: Vec<u64> = conns.open.keys().copied().collect();
        for id in ids {
            conns.finish(id);
        }
        assert_eq!((conns.held, conns.per_ip.len()), (0, 0));
    }
}
