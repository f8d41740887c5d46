//! The control loop of an overlay node (relay, PoP or server).
//!
//! One thread per control socket receives control datagrams and stamps them with their
//! arrival time and the local address they were sent to; the loop feeds them to the
//! sans-IO [`ott_tree::Node`], sends what it asks, hands forwarding-table changes to the
//! data plane, and answers status queries. Nothing blocks the loop but its `select!`.
//!
//! An answer to a request (a heartbeat's ack, a probe's reply, a catalogue, an error)
//! leaves from the address the request was sent to, so that an asker who knows the node
//! by that address sees the answer come from it ([`ControlSockets`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use ott_tree::{Event, Node};

use crate::counters::{add, Counters};
use crate::ctrlio::{is_answer, is_unproven_answer, send_control, Datagram, StatusQuery};
use crate::datacmd::{self, DataCmd};
use crate::keying::{ControlGate, ControlSender, Refused};
use crate::net::ControlSockets;

/// How often the data plane is asked how long each stream has been silent ...
const SILENCE_CHECK: Duration = Duration::from_millis(25);
/// ... and how long a silence makes the node suspect its parent.
const SILENT_AFTER: Duration = Duration::from_millis(100);

/// Everything the control loop talks to.
pub struct NodeLoop {
    /// The state machine.
    pub node: Node,
    /// Control sockets (sending side; clones are read by the receiver threads).
    pub ctrl: ControlSockets,
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
    /// Checks the overlay key on received datagrams (see [`crate::keying`]).
    pub gate: ControlGate,
    /// Seals what is sent to overlay members.
    pub sender: ControlSender,
}

impl NodeLoop {
    /// Run until a shutdown signal; then tell neighbours and parents, and return.
    pub fn run(mut self) -> anyhow::Result<()> {
        let silence = crossbeam_channel::tick(SILENCE_CHECK);
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
                recv(silence) -> _ => self.check_silence(),
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
        match self.gate.open(Some(d.from), &d.bytes) {
            Ok(msg) => {
                self.node.handle(d.at, d.from, msg);
                // Answers to it leave from the address it was sent to.
                let request_len = (!self.gate.is_member(d.from)).then_some(d.bytes.len());
                self.drain_answering(Some((d.from, d.local)), request_len);
            }
            Err(Refused::Auth(why)) => {
                add(&self.counters.auth_failed, 1);
                tracing::debug!(from = %d.from, %why, "dropping control datagram: overlay key check failed");
            }
            Err(Refused::Malformed(e)) => {
                add(&self.counters.malformed, 1);
                tracing::debug!(from = %d.from, error = %e, "dropping undecodable control datagram");
            }
        }
    }

    fn drain(&mut self) {
        self.drain_answering(None, None);
    }

    /// Tell the node of every stream whose media from its parent stopped for
    /// [`SILENT_AFTER`] (issue 11): it suspects the parent and moves at once.
    fn check_silence(&mut self) {
        let node = &self.node;
        let ups: Vec<(u32, String)> = (node.stream_ids().into_iter())
            .filter_map(|s| Some((s, node.upstream(s)?.to_owned())))
            .collect();
        if ups.is_empty() {
            return;
        }
        let snap = datacmd::snapshot(&self.data);
        let now = Instant::now();
        for (s, up) in ups {
            let idle = snap
                .get(&s)
                .and_then(|t| t.idle_ms)
                .map(Duration::from_millis);
            if let Some(idle) = idle.filter(|i| *i >= SILENT_AFTER) {
                let since = now.checked_sub(idle).unwrap_or(now);
                self.node.handle_upstream_silent(now, &up, s, since);
            }
        }
    }

    /// Send what the node asks and pass its events on. `asked`: the sender of the
    /// datagram just handled and the local address it came in on; `request_len`: that
    /// datagram's size when the sender is not an overlay member.
    fn drain_answering(
        &mut self,
        asked: Option<(SocketAddr, Option<IpAddr>)>,
        request_len: Option<usize>,
    ) {
        while let Some(t) = self.node.poll_transmit() {
            // No amplification towards an address that has not proved it receives there
            // (a forged source): what answers a stranger is no bigger than its request.
            if let (Some((asker, _)), Some(max)) = (asked, request_len) {
                if t.to.ip() == asker.ip()
                    && is_unproven_answer(&t.msg)
                    && ott_proto::encode(&t.msg).map_or(true, |b| b.len() > max)
                {
                    add(&self.counters.answer_too_big, 1);
                    tracing::debug!(to = %t.to, kind = t.msg.kind(), max, "answer bigger than its request not sent");
                    continue;
                }
            }
            let from = match asked {
                Some((asker, local)) if asker == t.to && is_answer(&t.msg) => local,
                _ => None,
            };
            send_control(
                &self.ctrl,
                &self.counters,
                &mut self.sender,
                t.to,
                from,
                &t.msg,
            );
        }
        while let Some(ev) = self.node.poll_event() {
            match ev {
                Event::Forwarding {
                    stream,
                    children,
                    sessions,
                } => {
                    let name = self
                        .node
                        .catalogue()
                        .into_iter()
                        .find(|s| s.id == stream)
                        .map_or_else(|| format!("{stream:#010x}"), |s| s.name);
                    tracing::debug!(stream = %name, children = children.len(), "forwarding changed");
                    let _ = self.data.send(DataCmd::Route {
                        stream,
                        name,
                        children,
                        sessions,
                    });
                }
                Event::ParentChanged { server, old, new } => {
                    let name = |p: &Option<String>| p.clone().unwrap_or_else(|| "none".into());
                    tracing::info!(%server, old = %name(&old), new = %name(&new), "parent changed");
                }
                Event::NeighbourUp(id) => tracing::info!(neighbour = %id, "neighbour up"),
                Event::NeighbourDown(id) => tracing::info!(neighbour = %id, "neighbour down"),
            }
        }
    }

    fn status_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self.node.status()).unwrap_or_default();
        let traffic = datacmd::snapshot(&self.data);
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "counters".into(),
                serde_json::to_value(self.counters.snapshot()).unwrap_or_default(),
            );
            // What the tree and the neighbour table refused (unknown senders, forged
            // incarnations, announcements too far ahead, ...).
            let nb = self.node.neighbours();
            obj.insert(
                "tree_stats".into(),
                serde_json::to_value(self.node.stats()).unwrap_or_default(),
            );
            obj.insert(
                "liveness".into(),
                serde_json::json!({
                    "unknown_sender": nb.unknown_sender_count(),
                    "refused_incarnation": nb.refused_incarnation_count(),
                    "stalls": nb.stall_count(),
                }),
            );
            // Heartbeat loss and counts of each neighbour, next to its RTT.
            for e in obj
                .get_mut("neighbours")
                .and_then(|n| n.as_array_mut())
                .into_iter()
                .flatten()
            {
                let id = e.get("id").and_then(|i| i.as_str()).unwrap_or_default();
                if let Some(i) = nb.iter().find(|i| i.id == id) {
                    if let Some(e) = e.as_object_mut() {
                        e.insert("loss".into(), serde_json::json!(i.loss_ratio()));
                        e.insert("heartbeats_sent".into(), i.heartbeats_sent.into());
                        e.insert("heartbeats_acked".into(), i.heartbeats_acked.into());
                    }
                }
            }
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
