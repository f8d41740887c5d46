//! The interface between a node's control loop and its data plane (the relay's
//! forwarder or the server's media thread): forwarding-table commands in, per-stream
//! traffic out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use crossbeam_channel::Sender;
use ott_datapath::StreamStats;
use ott_proto::auth::SessionKey;
use serde::Serialize;

/// Commands from the control loop to the forwarding thread.
#[derive(Debug)]
pub enum DataCmd {
    /// Replace the children of a stream.
    Route {
        /// The stream.
        stream: u32,
        /// Its name, for logs.
        name: String,
        /// Data addresses to send it to; empty removes the route (and every piece of
        /// state of the stream).
        children: Vec<SocketAddr>,
        /// The children that are viewers, with their session keys: what they get is
        /// tagged with it (see [`ott_proto::auth::SessionKey`]).
        sessions: Vec<(SocketAddr, SessionKey)>,
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
    /// Bytes of those.
    pub bytes_in: u64,
    /// Frames received (first fragments).
    pub frames_in: u64,
    /// Media datagrams sent to children.
    pub packets_out: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Another source's datagrams dropped (one source at a time).
    pub other_source: u64,
    /// Current number of children.
    pub children: usize,
    /// NACK messages sent upstream.
    pub nacks_sent: u64,
    /// NACK messages received from children.
    pub nacks_received: u64,
    /// NACKs from children answered with at least one datagram.
    pub nacks_answered: u64,
    /// Children's NACKs for datagrams from before this node had the stream, passed upstream.
    pub nacks_relayed: u64,
    /// Datagrams resent to children answering their NACKs.
    pub retransmitted: u64,
    /// Missing datagrams given up (not recovered within the budget).
    pub given_up: u64,
    /// Milliseconds since the last live (not resent) media datagram, if any came.
    pub idle_ms: Option<u64>,
}

impl From<StreamStats> for StreamTraffic {
    fn from(s: StreamStats) -> Self {
        Self {
            packets_in: s.datagrams_in,
            bytes_in: s.bytes_in,
            frames_in: s.frames_in,
            packets_out: s.datagrams_out,
            duplicates: s.duplicates,
            other_source: s.other_source,
            children: s.children,
            nacks_sent: s.nacks_sent,
            nacks_received: s.nacks_received,
            nacks_answered: s.nacks_answered,
            nacks_relayed: s.nacks_relayed,
            retransmitted: s.retransmitted,
            given_up: s.given_up,
            idle_ms: None,
        }
    }
}

/// Per-stream traffic, keyed by stream id.
pub type DataSnapshot = HashMap<u32, StreamTraffic>;

/// Ask the forwarding thread for its per-stream traffic (empty if it does not answer in time).
pub fn snapshot(cmds: &Sender<DataCmd>) -> DataSnapshot {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if cmds.send(DataCmd::Snapshot(tx)).is_err() {
        return DataSnapshot::new();
    }
    rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default()
}
