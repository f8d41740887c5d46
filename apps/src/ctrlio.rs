//! Control-socket plumbing shared by the node's control loop ([`crate::driver`]) and
//! the viewer ([`crate::viewer`]): receiver threads that stamp each datagram with its
//! arrival time and local address, sending a control message (answers leave from the
//! address they were asked on, and an answer to a non-member is never bigger than its
//! request), and the `--status` source that queries a loop over a channel.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::counters::{add, Counters};
use crate::keying::ControlSender;
use crate::net::ControlSockets;

/// A received datagram, stamped when it arrived.
#[derive(Debug)]
pub struct Datagram {
    /// Arrival time.
    pub at: Instant,
    /// Sender.
    pub from: SocketAddr,
    /// The local address it was sent to, when known (`IP_PKTINFO`).
    pub local: Option<IpAddr>,
    /// Bytes.
    pub bytes: Vec<u8>,
}

/// Start a thread that reads `sock` and sends each datagram, stamped, on the returned channel.
pub fn spawn_receiver(
    sock: UdpSocket,
    name: &str,
    counters: Arc<Counters>,
) -> std::io::Result<Receiver<Datagram>> {
    spawn_receivers(vec![sock], name, counters)
}

/// Start one thread per socket, each sending every datagram it reads, stamped with its
/// arrival time and the local address it was sent to, on the one returned channel.
pub fn spawn_receivers(
    socks: Vec<UdpSocket>,
    name: &str,
    counters: Arc<Counters>,
) -> std::io::Result<Receiver<Datagram>> {
    let (tx, rx) = crossbeam_channel::bounded(4096);
    for sock in socks {
        spawn_reader(sock, name, counters.clone(), tx.clone())?;
    }
    Ok(rx)
}

fn spawn_reader(
    sock: UdpSocket,
    name: &str,
    counters: Arc<Counters>,
    tx: Sender<Datagram>,
) -> std::io::Result<()> {
    // Best effort: without it (IPv6) the bound address stands for the destination.
    let _ = crate::pktinfo::enable(&sock);
    let bound = sock
        .local_addr()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified());
    thread::Builder::new().name(name.into()).spawn(move || {
        let mut buf = vec![0u8; 65536];
        loop {
            match crate::pktinfo::recv(&sock, &mut buf) {
                Ok((len, from, local)) => {
                    counters.rx(len);
                    let d = Datagram {
                        at: Instant::now(),
                        from,
                        local: local.or(bound),
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
    Ok(())
}

/// Send one control message, counting the outcome; never fails the caller.
pub fn send_msg(sock: &UdpSocket, counters: &Counters, to: SocketAddr, msg: &ott_proto::Message) {
    match ott_proto::encode(msg) {
        Ok(buf) => count_send(counters, to, msg, sock.send_to(&buf, to)),
        Err(e) => {
            tracing::warn!(error = %e, kind = msg.kind(), "cannot encode control message");
            add(&counters.dropped, 1);
        }
    }
}

/// Send one control message on a node's control sockets, from the local address `from`
/// when given, sealed for a member or plain for a viewer (see [`crate::keying`]),
/// counting the outcome; never fails the caller.
pub fn send_control(
    socks: &ControlSockets,
    counters: &Counters,
    sender: &mut ControlSender,
    to: SocketAddr,
    from: Option<IpAddr>,
    msg: &ott_proto::Message,
) {
    match sender.encode(to, msg) {
        Ok(buf) => count_send(counters, to, msg, socks.send(&buf, to, from)),
        Err(e) => {
            tracing::warn!(error = %e, kind = msg.kind(), "cannot encode control message");
            add(&counters.dropped, 1);
        }
    }
}

/// Whether `msg` answers the request it was made for (and so leaves from the address
/// the request was sent to). Subscriptions (`Join`, `Leave`) never do: media comes back
/// to the address they leave from.
pub(crate) fn is_answer(msg: &ott_proto::Message) -> bool {
    use ott_proto::Message as M;
    matches!(
        msg,
        M::HeartbeatAck { .. } | M::ProbeReply { .. } | M::Streams { .. } | M::Error { .. }
    )
}

/// Answers a PoP sends to a viewer's address before the viewer proved it receives
/// there: bounded by the request's size.
pub(crate) fn is_unproven_answer(msg: &ott_proto::Message) -> bool {
    use ott_proto::Message as M;
    matches!(
        msg,
        M::Cookie { .. } | M::ProbeReply { .. } | M::Streams { .. } | M::Error { .. }
    )
}

fn count_send(
    counters: &Counters,
    to: SocketAddr,
    msg: &ott_proto::Message,
    sent: std::io::Result<usize>,
) {
    match sent {
        Ok(n) => counters.tx(n),
        Err(e) => {
            tracing::debug!(%to, error = %e, kind = msg.kind(), "control send failed");
            add(&counters.send_errors, 1);
        }
    }
}

/// A status query: the loop answers with the node's status as JSON.
pub type StatusQuery = Sender<serde_json::Value>;

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
