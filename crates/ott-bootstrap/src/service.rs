//! The bootstrapper service: answers requests from a topology.

use std::io::{self, ErrorKind};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use ott_overlay::{AddressPlan, Role, Topology, CONTROL_PORT, DATA_PORT};
use ott_proto::auth::OverlayKey;
use tracing::{debug, info, warn};

use crate::keyed::{check_request, seal_response, AnyRequest};
use crate::{
    read_frame_body, write_frame, Assignment, BootstrapError, Peer, Request, Response,
    ANONYMOUS_CLIENT_ID,
};

/// Default read and write timeout of one connection.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on connections served at once; more are refused politely.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// How long the accept loop sleeps when no connection is waiting.
const ACCEPT_POLL: Duration = Duration::from_millis(50);
/// How many ids a refusal lists before it elides the rest.
const LISTED_IDS: usize = 20;

/// The bootstrapper: a topology, an address plan and connection limits.
#[derive(Debug)]
pub struct Service {
    topology: Topology,
    plan: AddressPlan,
    io_timeout: Duration,
    max_connections: usize,
    active: AtomicUsize,
    /// The overlay key: node requests must be tagged with it (see [`crate::keyed`]).
    key: Option<OverlayKey>,
}

/// Decrements the active-connection count when a connection ends, however it ends.
struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Service {
    /// A service answering from `topology` with addresses from `plan`, with the default
    /// limits ([`DEFAULT_IO_TIMEOUT`], [`DEFAULT_MAX_CONNECTIONS`]).
    pub fn new(topology: Topology, plan: AddressPlan) -> Self {
        Self {
            topology,
            plan,
            io_timeout: DEFAULT_IO_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            active: AtomicUsize::new(0),
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

    /// Sets the read and write timeout of each connection (a zero duration is taken as
    /// one millisecond).
    pub fn with_io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Sets how many connections are served at once (at least one); further ones get a
    /// [`Response::Refused`] and are closed.
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
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
                let node = t
                    .node(id)
                    .ok_or_else(|| self.unknown_id(id, Role::is_overlay))?;
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
                    neighbours,
                    pops: self.pops_seen_from(id),
                    topology: t.name.clone(),
                })
            }
            Request::Client { id: Some(id) } => {
                let node = t
                    .node(id)
                    .ok_or_else(|| self.unknown_id(id, |r| r == Role::Client))?;
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

    fn peer(&self, target: &str, viewer: &str) -> Option<Peer> {
        let e = self.topology.endpoint_seen_from(target, viewer, self.plan);
        if e.is_none() {
            warn!(target, viewer, plan = %self.plan, "no address for node, left out");
        }
        e.map(|e| Peer {
            id: e.id,
            ctrl: e.ctrl,
            data: e.data,
        })
    }

    fn unknown_id(&self, id: &str, eligible: impl Fn(Role) -> bool) -> String {
        let ids: Vec<&str> = self
            .topology
            .nodes
            .iter()
            .filter(|n| eligible(n.role))
            .map(|n| n.id.as_str())
            .collect();
        let mut list = ids
            .iter()
            .take(LISTED_IDS)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if ids.len() > LISTED_IDS {
            list.push_str(&format!(", ... ({} more)", ids.len() - LISTED_IDS));
        }
        if ids.is_empty() {
            list.push_str("no such node");
        }
        format!(
            "unknown node id \"{id}\" (topology {} has: {list})",
            self.topology.name
        )
    }

    /// Serves requests on `listener` until `stop` is set.
    ///
    /// Each connection gets its own thread, read/write timeouts, and may send several
    /// requests; malformed or oversized frames get a [`Response::Refused`] and the
    /// connection is closed. Connections past the limit are answered with a refusal and
    /// closed. Checks `stop` at least every 50 ms; connection threads still running
    /// when it returns end by themselves within the I/O timeout.
    pub fn serve(self: Arc<Self>, listener: TcpListener, stop: Arc<AtomicBool>) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        info!(
            addr = ?listener.local_addr().ok(),
            topology = %self.topology.name,
            plan = %self.plan,
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

    /// Hands an accepted connection to a thread, or refuses it when at the limit.
    fn admit(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let previous = self.active.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max_connections {
            self.active.fetch_sub(1, Ordering::AcqRel);
            warn!(%peer, limit = self.max_connections, "too many connections, refusing");
            let reason = format!(
                "bootstrapper busy: {} connections already open, retry later",
                self.max_connections
            );
            // Best effort, with a short timeout: the accept loop must not stall.
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let mut stream = stream;
            let _ = write_frame(&mut stream, &Response::Refused { reason });
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        let service = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name("bootstrap-conn".into())
            .spawn(move || {
                let _guard = ActiveGuard(&service.active);
                service.handle_connection(stream, peer);
            });
        if let Err(e) = spawned {
            // The closure (and its guard) never ran: undo the count ourselves.
            self.active.fetch_sub(1, Ordering::AcqRel);
            warn!(%peer, error = %e, "cannot spawn a connection thread");
        }
    }

    /// Serves one connection until the peer closes it, goes silent or misbehaves.
    fn handle_connection(&self, mut stream: TcpStream, peer: SocketAddr) {
        let setup = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(self.io_timeout)))
            .and_then(|()| stream.set_write_timeout(Some(self.io_timeout)));
        if let Err(e) = setup {
            debug!(%peer, error = %e, "cannot set up connection");
            return;
        }
        let _ = stream.set_nodelay(true);
        loop {
            let frame = match read_frame_body(&mut stream).and_then(|b| AnyRequest::decode(&b)) {
                Ok(frame) => frame,
                Err(BootstrapError::Io(e)) => {
                    if e.kind() != ErrorKind::UnexpectedEof {
                        debug!(%peer, error = %e, "connection ended");
                    }
                    return;
                }
                Err(e) => {
                    info!(%peer, error = %e, "bad request, closing");
                    let reason = e.to_string();
                    let _ = write_frame(&mut stream, &Response::Refused { reason });
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            };
            let (req, nonce) = match check_request(self.key.as_ref(), frame) {
                Ok(c) => (c.request, c.nonce),
                Err(reason) => {
                    info!(%peer, %reason, "request refused by the key check");
                    let _ = write_frame(&mut stream, &Response::Refused { reason });
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            };
            let resp = self.answer(&req);
            match &resp {
                Response::Assigned(a) => info!(
                    %peer, id = %a.id, role = %a.role,
                    neighbours = a.neighbours.len(), "assigned"
                ),
                Response::Refused { reason } => info!(%peer, ?req, %reason, "refused"),
            }
            let sealed = match seal_response(self.key.as_ref(), nonce.as_ref(), resp) {
                Ok(sealed) => sealed,
                Err(e) => {
                    warn!(%peer, error = %e, "cannot encode the answer");
                    return;
                }
            };
            match write_frame(&mut stream, &sealed) {
                Ok(()) => {}
                Err(BootstrapError::TooLong(n)) => {
                    warn!(%peer, bytes = n, "assignment too large to send");
                    let reason = format!("assignment too large to send ({n} bytes)");
                    let _ = write_frame(&mut stream, &Response::Refused { reason });
                    return;
                }
                Err(e) => {
                    debug!(%peer, error = %e, "cannot answer");
                    return;
                }
            }
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
        assert_eq!(a.pops[0].ctrl, addr("127.1.0.3:7000"));
        let links = service(AddressPlan::Links);
        let a = assigned(links.answer(&Request::Client { id: None }));
        assert_eq!(a.bind_ctrl, addr("0.0.0.0:0"));
        // p1's first link is r1 - p1 (index 1): 10.0.1.2.
        assert_eq!(a.pops[0].ctrl, addr("10.0.1.2:7000"));
    }

    #[test]
    fn refusals_say_why() {
        let s = service(AddressPlan::Loopback);
        assert_eq!(
            refused(s.answer(&Request::Node { id: "x9".into() })),
            "unknown node id \"x9\" (topology tiny has: s1, r1, p1, p2)"
        );
        assert_eq!(
            refused(s.answer(&Request::Client {
                id: Some("x9".into())
            })),
            "unknown node id \"x9\" (topology tiny has: c1)"
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
    fn long_id_lists_are_elided() {
        let mut text = String::from("name = \"big\"\nbootstrapper = \"s0\"\n");
        for i in 0..30 {
            let role = if i == 0 { "server" } else { "client" };
            text.push_str(&format!("[[node]]\nid = \"s{i}\"\nrole = \"{role}\"\n"));
        }
        let s = Service::new(
            Topology::parse(&text, "big.toml").expect("valid"),
            AddressPlan::Loopback,
        );
        let reason = refused(s.answer(&Request::Client {
            id: Some("zz".into()),
        }));
        assert!(reason.ends_with(", s20, ... (9 more))"), "{reason}");
    }
}
