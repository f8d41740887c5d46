//! The control loop of an overlay node (relay, PoP or server).
//!
//! One thread receives control datagrams and stamps them with their arrival time; the
//! loop feeds them to the sans-IO [`ott_tree::Node`], sends what it asks, hands
//! forwarding-table changes to the data plane, and answers status queries. Nothing
//! blocks the loop but its `select!`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use ott_tree::{Event, Node};

use crate::counters::{add, Counters};
use crate::dataplane::{self, DataCmd};

/// A received datagram, stamped when it arrived.
#[derive(Debug)]
pub struct Datagram {
    /// Arrival time.
    pub at: Instant,
    /// Sender.
    pub from: SocketAddr,
    /// Bytes.
    pub bytes: Vec<u8>,
}

/// Start a thread that reads `sock` and sends each datagram, stamped, on the returned channel.
pub fn spawn_receiver(
    sock: UdpSocket,
    name: &str,
    counters: Arc<Counters>,
) -> std::io::Result<Receiver<Datagram>> {
    let (tx, rx) = crossbeam_channel::bounded(4096);
    thread::Builder::new().name(name.into()).spawn(move || {
        let mut buf = vec![0u8; 65536];
        loop {
            match sock.recv_from(&mut buf) {
                Ok((len, from)) => {
                    counters.rx(len);
                    let d = Datagram {
                        at: Instant::now(),
                        from,
                        bytes: buf[..len].to_vec(),
                    };
                    if tx.send(d).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    // Linux reports an ICMP port unreachable of an earlier send here.
                    tracing::debug!(error = %e, "receive error");
                    add(&counters.send_errors, 1);
                    // Never spin if the error repeats.
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
    })?;
    Ok(rx)
}

/// Send one control message, counting the outcome; never fails the caller.
pub fn send_msg(sock: &UdpSocket, counters: &Counters, to: SocketAddr, msg: &ott_proto::Message) {
    match ott_proto::encode(msg) {
        Ok(buf) => match sock.send_to(&buf, to) {
            Ok(n) => counters.tx(n),
            Err(e) => {
                tracing::debug!(%to, error = %e, kind = msg.kind(), "control send failed");
                add(&counters.send_errors, 1);
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, kind = msg.kind(), "cannot encode control message");
            add(&counters.dropped, 1);
        }
    }
}

/// A status query: the loop answers with the node's status as JSON.
pub type StatusQuery = Sender<serde_json::Value>;

/// Everything the control loop talks to.
pub struct NodeLoop {
    /// The state machine.
    pub node: Node,
    /// Control socket (sending side; a clone is read by the receiver thread).
    pub ctrl: UdpSocket,
    /// Datagrams from the control socket.
    pub rx: Receiver<Datagram>,
    /// Forwarding-table changes go here (the forwarder, or the server's media thread).
    pub data: Sender<DataCmd>,
    /// Counters of the whole program.
    pub counters: Arc<Counters>,
    /// Status queries.
    pub status: Receiver<StatusQuery>,
    /// SIGINT / SIGTERM.
    pub shutdown: Receiver<()>,
}

impl NodeLoop {
    /// Run until a shutdown signal; then tell neighbours and parents, and return.
    pub fn run(mut self) -> anyhow::Result<()> {
        loop {
            self.drain();
            let timer = self
                .node
                .poll_timeout()
                .map(crossbeam_channel::at)
                .unwrap_or_else(crossbeam_channel::never);
            select! {
                recv(self.rx) -> d => {
                    let d = d.map_err(|_| anyhow::anyhow!("control receiver stopped"))?;
                    self.on_datagram(d);
                }
                recv(timer) -> _ => {
                    // Datagrams already received count first: a loop that fell behind
                    // must not declare a neighbour dead whose heartbeat is in the queue.
                    for _ in 0..1024 {
                        let Ok(d) = self.rx.try_recv() else { break };
                        self.on_datagram(d);
                        self.drain();
                    }
                    self.node.handle_timeout(Instant::now());
                }
                recv(self.status) -> q => {
                    if let Ok(reply) = q {
                        let _ = reply.send(self.status_json());
                    }
                }
                recv(self.shutdown) -> _ => {
                    tracing::info!("shutting down: leaving streams and telling neighbours");
                    self.node.shutdown(Instant::now());
                    self.drain();
                    let _ = self.data.send(DataCmd::Stop);
                    return Ok(());
                }
            }
        }
    }

    fn on_datagram(&mut self, d: Datagram) {
        match ott_proto::decode(&d.bytes) {
            Ok(msg) => self.node.handle(d.at, d.from, msg),
            Err(e) => {
                add(&self.counters.malformed, 1);
                tracing::debug!(from = %d.from, error = %e, "dropping undecodable control datagram");
            }
        }
    }

    fn drain(&mut self) {
        while let Some(t) = self.node.poll_transmit() {
            send_msg(&self.ctrl, &self.counters, t.to, &t.msg);
        }
        while let Some(ev) = self.node.poll_event() {
            match ev {
                Event::Forwarding { stream, children } => {
                    tracing::debug!(stream, children = children.len(), "forwarding changed");
                    let _ = self.data.send(DataCmd::Route { stream, children });
                }
                Event::ParentChanged { server, old, new } => {
                    tracing::info!(%server, ?old, ?new, "parent changed");
                }
                Event::NeighbourUp(id) => tracing::info!(neighbour = %id, "neighbour up"),
                Event::NeighbourDown(id) => tracing::info!(neighbour = %id, "neighbour down"),
            }
        }
    }

    fn status_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self.node.status()).unwrap_or_default();
        let traffic = dataplane::snapshot(&self.data);
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "counters".into(),
                serde_json::to_value(self.counters.snapshot()).unwrap_or_default(),
            );
            obj.insert(
                "tree_stats".into(),
                serde_json::to_value(self.node.stats()).unwrap_or_default(),
            );
            // Attach per-stream media traffic to each stream entry.
            if let Some(streams) = obj.get_mut("streams").and_then(|s| s.as_object_mut()) {
                for entry in streams.values_mut() {
                    let id = entry.get("id").and_then(|i| i.as_u64()).unwrap_or(u64::MAX);
                    if let Some(t) = u32::try_from(id).ok().and_then(|id| traffic.get(&id)) {
                        if let Some(e) = entry.as_object_mut() {
                            e.insert(
                                "traffic".into(),
                                serde_json::to_value(t).unwrap_or_default(),
                            );
                        }
                    }
                }
            }
        }
        v
    }
}

/// The `--status` source of a node: asks the control loop over a channel.
pub struct LoopStatus {
    /// Node id, for the metrics labels.
    pub id: String,
    /// Query channel into the loop.
    pub queries: Sender<StatusQuery>,
    /// Counters.
    pub counters: Arc<Counters>,
}

impl crate::status::StatusSource for LoopStatus {
    fn status(&self) -> serde_json::Value {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.queries.send(tx).is_err() {
            return serde_json::json!({"id": self.id, "error": "node is shutting down"});
        }
        rx.recv_timeout(Duration::from_secs(2))
            .unwrap_or_else(|_| serde_json::json!({"id": self.id, "error": "node did not answer"}))
    }

    fn metrics(&self) -> String {
        self.counters.snapshot().to_prometheus(&self.id)
    }
}
