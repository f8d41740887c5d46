//! The node side of the dashboard: every `--report-ms` (500 ms), a server, relay or PoP
//! sends its state to the bootstrapper as one [`StateReport`] datagram (UDP, to the
//! port of the bootstrapper's TCP address unless `--report-to` says otherwise).
//!
//! The reporter is a thread of its own: it asks the control loop for the snapshot the
//! loop already makes for `/status` (over the same query channel), turns it into a
//! report ([`ReportBuilder`]), and sends it from a socket bound to the node's own
//! address, since the bootstrapper accepts a node's reports only from the addresses the
//! topology gives that node. When the control loop has ended, one last report says the
//! node is leaving.
//!
//! **Overlay key.** Every datagram passes through `Reporter::seal` just before it is
//! sent: the one place where sealing with the overlay key wraps the report (the
//! bootstrapper unwraps in [`crate::dashboard::Opener`] before decoding).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::Sender;
use ott_proto::report::{NeighbourReport, RouteReport, StateReport, StreamReport};
use serde::Deserialize;

use crate::ctrlio::StatusQuery;

/// Default period of state reports, ms.
pub const DEFAULT_REPORT_MS: u64 = 500;

/// Where a child in `/status` is a viewer rather than an overlay node.
const VIEWER_PREFIX: &str = "client@";

/// The state-report flags of `ott-node` and `ott-server`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct ReportArgs {
    /// Period of the state reports sent to the bootstrapper for its dashboard, ms
    /// (0: send none).
    #[arg(long, default_value_t = DEFAULT_REPORT_MS, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub report_ms: u64,
    /// Where state reports go (UDP). Default: the bootstrapper's address (--bootstrap),
    /// on the same port number.
    #[arg(long, value_name = "ADDR", value_parser = crate::args::parse_addr)]
    pub report_to: Option<SocketAddr>,
}

impl Default for ReportArgs {
    fn default() -> Self {
        Self {
            report_ms: DEFAULT_REPORT_MS,
            report_to: None,
        }
    }
}

impl ReportArgs {
    /// These flags, with `bootstrap` as the destination unless `--report-to` was given.
    pub fn or_bootstrapper(self, bootstrap: SocketAddr) -> Self {
        Self {
            report_to: self.report_to.or(Some(bootstrap)),
            ..self
        }
    }
}

/// The parts of a node's `/status` document a report carries.
#[derive(Debug, Deserialize)]
struct StatusView {
    id: String,
    role: String,
    parent: Option<String>,
    #[serde(default)]
    path: Vec<String>,
    latency_ms: Option<f64>,
    hops: Option<u32>,
    #[serde(default)]
    neighbours: Vec<NeighbourView>,
    #[serde(default)]
    streams: BTreeMap<String, StreamView>,
    #[serde(default)]
    servers: Vec<RouteView>,
}

#[derive(Debug, Deserialize)]
struct NeighbourView {
    id: String,
    alive: bool,
    rtt_ms: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct StreamView {
    upstream: Option<String>,
    #[serde(default)]
    children: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct RouteView {
    server: String,
    parent: Option<String>,
    latency_ms: Option<f64>,
    hops: Option<u32>,
}

fn us(ms: Option<f64>) -> Option<u64> {
    // `as` saturates: a negative or NaN latency becomes 0, a huge one u64::MAX.
    ms.map(|ms| (ms * 1000.0).round() as u64)
}

/// Turns `/status` snapshots into numbered reports. Pure: no I/O, no clock.
#[derive(Debug, Clone)]
pub struct ReportBuilder {
    id: String,
    incarnation: u64,
    seq: u64,
}

impl ReportBuilder {
    /// Reports of node `id`, restarted at `incarnation` (grows at each restart).
    pub fn new(id: &str, incarnation: u64) -> Self {
        Self {
            id: id.to_owned(),
            incarnation,
            seq: 0,
        }
    }

    fn next(&mut self) -> StateReport {
        self.seq += 1;
        StateReport {
            id: self.id.clone(),
            incarnation: self.incarnation,
            seq: self.seq,
            ..StateReport::default()
        }
    }

    /// The next report, from a `/status` document of the node; an error names what the
    /// document lacks.
    pub fn build(&mut self, status: &serde_json::Value) -> Result<StateReport, String> {
        let v = StatusView::deserialize(status).map_err(|e| format!("status snapshot: {e}"))?;
        if v.id != self.id {
            return Err(format!("status snapshot of {:?}, not {:?}", v.id, self.id));
        }
        let mut r = self.next();
        r.role = v.role;
        r.server = v.path.first().cloned();
        r.parent = v.parent;
        r.latency_us = us(v.latency_ms);
        r.hops = v.hops;
        r.routes = v
            .servers
            .into_iter()
            .map(|s| RouteReport {
                server: s.server,
                parent: s.parent,
                latency_us: us(s.latency_ms),
                hops: s.hops,
            })
            .collect();
        let mut viewers = BTreeSet::new();
        r.streams = v
            .streams
            .into_iter()
            .map(|(name, s)| {
                let (clients, nodes): (Vec<String>, Vec<String>) = s
                    .children
                    .into_iter()
                    .partition(|c| c.starts_with(VIEWER_PREFIX));
                let count = u32::try_from(clients.len()).unwrap_or(u32::MAX);
                viewers.extend(
                    clients
                        .into_iter()
                        .map(|c| c.trim_start_matches(VIEWER_PREFIX).to_owned()),
                );
                StreamReport {
                    name,
                    upstream: s.upstream,
                    children: nodes,
                    viewers: count,
                }
            })
            .collect();
        r.neighbours = v
            .neighbours
            .into_iter()
            .map(|n| NeighbourReport {
                id: n.id,
                alive: n.alive,
                rtt_us: us(n.rtt_ms),
            })
            .collect();
        r.viewers = u32::try_from(viewers.len()).unwrap_or(u32::MAX);
        r.viewer_addrs = viewers.into_iter().collect();
        Ok(r)
    }

    /// The last report of a node that is shutting down.
    pub fn leaving(&mut self) -> StateReport {
        let mut r = self.next();
        r.leaving = true;
        r
    }
}

/// A hook applied to every report datagram just before it is sent (sealing with the
/// overlay key).
pub type Seal = Box<dyn FnMut(Vec<u8>) -> Vec<u8> + Send>;

/// Sends a node's reports: a socket, a destination, and the sealing hook.
pub struct Reporter {
    sock: UdpSocket,
    to: SocketAddr,
    builder: ReportBuilder,
    seal: Option<Seal>,
    /// Reports sent.
    pub sent: u64,
    /// Reports that could not be built, encoded or sent.
    pub failed: u64,
}

impl Reporter {
    /// A reporter for node `id` that sends from `sock` to `to`.
    pub fn new(sock: UdpSocket, to: SocketAddr, id: &str, incarnation: u64) -> Self {
        Self {
            sock,
            to,
            builder: ReportBuilder::new(id, incarnation),
            seal: None,
            sent: 0,
            failed: 0,
        }
    }

    /// Seal every datagram with `seal` before sending it.
    pub fn with_seal(mut self, seal: Seal) -> Self {
        self.seal = Some(seal);
        self
    }

    /// Build, encode, seal and send one report from a `/status` document.
    pub fn report(&mut self, status: &serde_json::Value) {
        match self.builder.build(status) {
            Ok(r) => self.send(r),
            Err(e) => {
                self.failed += 1;
                tracing::debug!(error = %e, "no state report this time");
            }
        }
    }

    /// Send the last report, saying the node is leaving.
    pub fn leave(&mut self) {
        let r = self.builder.leaving();
        self.send(r);
    }

    fn seal(&mut self, bytes: Vec<u8>) -> Vec<u8> {
        match &mut self.seal {
            Some(seal) => seal(bytes),
            None => bytes,
        }
    }

    fn send(&mut self, mut r: StateReport) {
        let bytes = match r.encode_fitted() {
            Ok(b) => self.seal(b),
            Err(e) => {
                self.failed += 1;
                tracing::debug!(error = %e, "cannot encode state report");
                return;
            }
        };
        match self.sock.send_to(&bytes, self.to) {
            Ok(_) => self.sent += 1,
            Err(e) => {
                self.failed += 1;
                tracing::debug!(to = %self.to, error = %e, "state report not sent");
            }
        }
    }
}

/// Start the reporting thread of node `id` bound at `own_ip`, asking the control loop
/// for snapshots on `queries`, sealing each datagram with `seal` if given (the overlay
/// key). Returns `None` when reports are off (`--report-ms 0`, or no destination) or
/// the socket cannot be bound (logged: the node runs on without).
pub fn start(
    id: &str,
    own_ip: IpAddr,
    args: ReportArgs,
    queries: Sender<StatusQuery>,
    seal: Option<Seal>,
) -> Option<JoinHandle<()>> {
    let to = args.report_to?;
    if args.report_ms == 0 {
        return None;
    }
    // A node bound to every address (links plan) sends from the one its route picks,
    // which is one of its link addresses: the bootstrapper knows them all.
    let bind_ip = if own_ip.is_unspecified() && to.is_ipv4() {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        own_ip
    };
    let sock = match UdpSocket::bind(SocketAddr::new(bind_ip, 0)) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(ip = %bind_ip, error = %e, "cannot bind the state-report socket: no reports");
            return None;
        }
    };
    let mut reporter = Reporter::new(sock, to, id, crate::node_runtime::incarnation());
    if let Some(seal) = seal {
        reporter = reporter.with_seal(seal);
    }
    let period = Duration::from_millis(args.report_ms);
    tracing::debug!(%to, ?period, "state reports");
    thread::Builder::new()
        .name("report".into())
        .spawn(move || loop {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if queries.send(tx).is_err() {
                reporter.leave();
                return;
            }
            match rx.recv_timeout(Duration::from_secs(2)) {
                Ok(status) => reporter.report(&status),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    reporter.leave();
                    return;
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => reporter.failed += 1,
            }
            thread::sleep(period);
        })
        .map_err(|e| tracing::warn!(error = %e, "cannot start the state-report thread"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ott_tree::{NeighbourStatus, NodeStatus, RouteStatus, StreamStatus};

    fn pop_status() -> serde_json::Value {
        let status = NodeStatus {
            id: "p1".into(),
            role: "pop".into(),
            parent: Some("r1".into()),
            path: vec!["s1".into(), "r1".into(), "p1".into()],
            latency_ms: Some(2.5),
            hops: Some(2),
            neighbours: vec![
                NeighbourStatus {
                    id: "r1".into(),
                    alive: true,
                    rtt_ms: Some(0.4),
                },
                NeighbourStatus {
                    id: "r2".into(),
                    alive: false,
                    rtt_ms: None,
                },
            ],
            streams: [
                (
                    "news".to_string(),
                    StreamStatus {
                        id: 1,
                        upstream: Some("r1".into()),
                        children: vec![
                            "client@127.0.0.1:5000".into(),
                            "p2".into(),
                            "client@127.0.0.1:5002".into(),
                        ],
                    },
                ),
                (
                    "sport".to_string(),
                    StreamStatus {
                        id: 2,
                        upstream: None,
                        children: vec![],
                    },
                ),
            ]
            .into_iter()
            .collect(),
            servers: vec![RouteStatus {
                server: "s1".into(),
                parent: Some("r1".into()),
                path: vec!["s1".into(), "r1".into(), "p1".into()],
                latency_ms: Some(2.5),
                hops: Some(2),
            }],
        };
        let mut v = serde_json::to_value(status).expect("serializes");
        // The control loop adds counters; the builder ignores what it does not know.
        v["counters"] = serde_json::json!({"packets_in": 3});
        v
    }

    #[test]
    fn test_build_from_status() {
        let mut b = ReportBuilder::new("p1", 7);
        let r = b.build(&pop_status()).expect("builds");
        assert_eq!((r.incarnation, r.seq), (7, 1));
        assert_eq!(r.role, "pop");
        assert_eq!(r.server.as_deref(), Some("s1"));
        assert_eq!(r.parent.as_deref(), Some("r1"));
        assert_eq!((r.latency_us, r.hops), (Some(2_500), Some(2)));
        assert_eq!(r.routes[0].parent.as_deref(), Some("r1"));
        let news = &r.streams[0];
        assert_eq!(news.name, "news");
        assert_eq!(news.children, vec!["p2".to_string()]);
        assert_eq!(news.viewers, 2);
        assert_eq!(r.streams[1].upstream, None);
        assert_eq!(r.viewers, 2);
        assert_eq!(r.viewer_addrs, vec!["127.0.0.1:5000", "127.0.0.1:5002"]);
        assert_eq!(r.neighbours[0].rtt_us, Some(400));
        assert!(!r.neighbours[1].alive);
        assert_eq!(b.build(&pop_status()).expect("builds").seq, 2);
        let last = b.leaving();
        assert!(last.leaving && last.seq == 3);
    }

    #[test]
    fn test_build_refuses_another_node_or_an_error_document() {
        let mut b = ReportBuilder::new("p2", 1);
        assert!(b.build(&pop_status()).unwrap_err().contains("not \"p2\""));
        let err = serde_json::json!({"id": "p2", "error": "node did not answer"});
        assert!(b.build(&err).unwrap_err().contains("status snapshot"));
    }

    #[test]
    fn test_reporter_sends_sealed_datagrams() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("binds");
        rx.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("binds");
        let to = rx.local_addr().expect("addr");
        let mut r = Reporter::new(tx, to, "p1", 3).with_seal(Box::new(|mut b| {
            b.insert(0, b'!');
            b
        }));
        r.report(&pop_status());
        r.leave();
        assert_eq!((r.sent, r.failed), (2, 0));
        let mut buf = [0u8; 2048];
        let (n, _) = rx.recv_from(&mut buf).expect("report arrives");
        assert_eq!(buf[0], b'!', "the seal hook ran");
        let got = ott_proto::report::decode_report(&buf[1..n]).expect("decodes");
        assert_eq!((got.id.as_str(), got.seq, got.viewers), ("p1", 1, 2));
        let (n, _) = rx.recv_from(&mut buf).expect("last report arrives");
        let got = ott_proto::report::decode_report(&buf[1..n]).expect("decodes");
        assert!(got.leaving);
    }
}
