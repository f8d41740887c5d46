//! The media forwarding thread of a relay or PoP.
//!
//! It reads media datagrams from the node's data socket, parses only the fixed header,
//! drops duplicates (a make-before-break switch briefly receives a stream twice), and
//! sends the same bytes to every child of the stream. The forwarding table is a private
//! copy updated through [`DataCmd`]s from the control loop, so the hot path takes no lock.
//! A failed send to one child is counted and never stops forwarding to the others.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use ott_proto::MediaHeader;
use serde::Serialize;

use crate::counters::{add, Counters};
use crate::dedup::SeqWindow;

/// Commands from the control loop to the forwarding thread.
#[derive(Debug)]
pub enum DataCmd {
    /// Replace the children of a stream.
    Route {
        /// The stream.
        stream: u32,
        /// Data addresses to send it to; empty removes the route.
        children: Vec<SocketAddr>,
    },
    /// Answer with the per-stream traffic.
    Snapshot(Sender<DataSnapshot>),
    /// End the thread.
    Stop,
}

/// Media traffic of one stream at this node.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamTraffic {
    /// Media datagrams received (duplicates included).
    pub packets_in: u64,
    /// Media datagrams sent to children.
    pub packets_out: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Current number of children.
    pub children: usize,
}

/// Per-stream traffic, keyed by stream id.
pub type DataSnapshot = HashMap<u32, StreamTraffic>;

struct StreamState {
    children: Vec<SocketAddr>,
    seen: SeqWindow,
    traffic: StreamTraffic,
}

impl StreamState {
    fn new() -> Self {
        Self {
            children: Vec::new(),
            seen: SeqWindow::new(),
            traffic: StreamTraffic::default(),
        }
    }
}

/// Start the forwarding thread on `sock`.
pub fn spawn_forwarder(
    sock: UdpSocket,
    counters: Arc<Counters>,
    cmds: Receiver<DataCmd>,
) -> std::io::Result<JoinHandle<()>> {
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    thread::Builder::new()
        .name("data-fwd".into())
        .spawn(move || forward_loop(&sock, &counters, &cmds))
}

fn forward_loop(sock: &UdpSocket, counters: &Counters, cmds: &Receiver<DataCmd>) {
    let mut streams: HashMap<u32, StreamState> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        loop {
            match cmds.try_recv() {
                Ok(DataCmd::Route { stream, children }) => {
                    let st = streams.entry(stream).or_insert_with(StreamState::new);
                    st.traffic.children = children.len();
                    st.children = children;
                }
                Ok(DataCmd::Snapshot(reply)) => {
                    let snap = streams
                        .iter()
                        .map(|(k, v)| (*k, v.traffic.clone()))
                        .collect();
                    let _ = reply.send(snap);
                }
                Ok(DataCmd::Stop) | Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => break,
            }
        }
        let (len, _from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                // ICMP errors from an earlier send surface here on Linux: count and go on.
                tracing::debug!(error = %e, "data socket receive error");
                add(&counters.send_errors, 1);
                continue;
            }
        };
        counters.rx(len);
        let datagram = &buf[..len];
        let header = match MediaHeader::parse(datagram) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = %e, "malformed media datagram");
                add(&counters.malformed, 1);
                continue;
            }
        };
        let st = streams
            .entry(header.stream)
            .or_insert_with(StreamState::new);
        st.traffic.packets_in += 1;
        if !st.seen.insert(header.seq) {
            st.traffic.duplicates += 1;
            add(&counters.duplicates, 1);
            continue;
        }
        if st.children.is_empty() {
            add(&counters.dropped, 1);
            continue;
        }
        for child in &st.children {
            match sock.send_to(datagram, child) {
                Ok(n) => {
                    counters.tx(n);
                    st.traffic.packets_out += 1;
                }
                Err(e) => {
                    tracing::debug!(%child, error = %e, "media send failed");
                    add(&counters.send_errors, 1);
                }
            }
        }
    }
}

/// Ask the forwarding thread for its per-stream traffic (empty if it does not answer in time).
pub fn snapshot(cmds: &Sender<DataCmd>) -> DataSnapshot {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if cmds.send(DataCmd::Snapshot(tx)).is_err() {
        return DataSnapshot::new();
    }
    rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default()
}
