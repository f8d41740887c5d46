//! The media forwarding thread of a relay or PoP.
//!
//! It reads media datagrams from the node's data socket in batches (`recvmmsg`), parses
//! only the fixed header, drops duplicates (a make-before-break switch briefly receives
//! a stream twice), and sends the same bytes to every child of the stream in batches
//! (`sendmmsg`), without a copy per child. The forwarding table is a private copy updated
//! through [`DataCmd`]s from the control loop, so the hot path takes no lock.
//!
//! Loss recovery is per hop and lives here too, so it never waits behind control
//! traffic: each stream keeps a bounded retransmission buffer to answer its children's
//! NACKs (which arrive on this socket), and a gap tracker that NACKs the upstream for
//! datagrams that did not arrive. A failed send to one child is counted and never stops
//! forwarding to the others. Each new child of a stream first gets the latest decodable
//! start ([`crate::gop_cache`]).
//!
//! With the overlay key ([`crate::keying`]), every media datagram's tag is checked
//! before its header is read (a failure is counted in `auth_failed` and dropped), NACKs
//! from children that are overlay members must be sealed, NACKs sent upstream are
//! sealed, and the tag is stripped from what goes to viewers; members get the server's
//! tagged bytes unchanged.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use ott_media::arq::{nacked_seqs, GapTracker, NackConfig, RetransmitBuffer};
use ott_proto::{flags, MediaHeader, Message, HEADER_LEN, MAGIC};
use serde::Serialize;

use crate::batch::{send_batch, RecvBatch};
use crate::counters::{add, Counters};
use crate::dedup::{StreamDedup, Verdict};
use crate::gop_cache::{self, StartCache};
use crate::keying::{ControlGate, ControlSender, Keying, Refused};

/// Datagrams read per system call.
pub const BATCH: usize = 64;
/// Datagrams of each stream kept for retransmission (about 3 MB at full size).
pub const RETRANSMIT_DEPTH: usize = 2048;
/// Most datagrams resent for one NACK.
pub const MAX_RESEND_PER_NACK: usize = 256;

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
    /// NACK messages sent upstream.
    pub nacks_sent: u64,
    /// Datagrams resent to children answering their NACKs.
    pub retransmitted: u64,
    /// Missing datagrams given up (not recovered within the budget).
    pub given_up: u64,
}

/// Per-stream traffic, keyed by stream id.
pub type DataSnapshot = HashMap<u32, StreamTraffic>;

struct StreamState {
    children: Vec<SocketAddr>,
    /// Per child: whether it is a viewer (gets the media without the tag).
    strip: Vec<bool>,
    seen: StreamDedup,
    traffic: StreamTraffic,
    buffer: RetransmitBuffer,
    gaps: GapTracker,
    /// Where the stream comes from (the parent's data socket), for NACKs.
    upstream: Option<SocketAddr>,
}

impl StreamState {
    fn new() -> Self {
        Self {
            children: Vec::new(),
            strip: Vec::new(),
            seen: StreamDedup::default(),
            traffic: StreamTraffic::default(),
            buffer: RetransmitBuffer::new(RETRANSMIT_DEPTH),
            gaps: GapTracker::new(NackConfig::default()),
            upstream: None,
        }
    }
}

/// One datagram to send: media from the receive batch, an owned copy of media (a
/// retransmission or a cached replay), each with or without its tag (`strip`: to a
/// viewer), or a control message (a NACK).
enum Out {
    Batch(usize, bool),
    Media(Bytes, bool),
    Control(Bytes),
}

/// Options of the forwarding thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwarderConfig {
    /// NACK the upstream for missing datagrams (per-hop loss recovery). Answering
    /// children's NACKs is always on.
    pub nack: bool,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        Self { nack: true }
    }
}

/// Start the forwarding thread on `sock` with the default configuration.
pub fn spawn_forwarder(
    sock: UdpSocket,
    counters: Arc<Counters>,
    cmds: Receiver<DataCmd>,
) -> std::io::Result<JoinHandle<()>> {
    spawn_forwarder_with(ForwarderConfig::default(), sock, counters, cmds)
}

/// Start the forwarding thread on `sock`.
pub fn spawn_forwarder_with(
    config: ForwarderConfig,
    sock: UdpSocket,
    counters: Arc<Counters>,
    cmds: Receiver<DataCmd>,
) -> std::io::Result<JoinHandle<()>> {
    spawn_forwarder_keyed(config, Keying::unkeyed(), 0, sock, counters, cmds)
}

/// Start the forwarding thread on `sock` with the overlay key (see [`crate::keying`]);
/// its NACKs count from `incarnation` on.
pub fn spawn_forwarder_keyed(
    config: ForwarderConfig,
    keying: Keying,
    incarnation: u64,
    sock: UdpSocket,
    counters: Arc<Counters>,
    cmds: Receiver<DataCmd>,
) -> std::io::Result<JoinHandle<()>> {
    sock.set_read_timeout(Some(Duration::from_millis(5)))?;
    thread::Builder::new()
        .name("data-fwd".into())
        .spawn(move || Forwarder::new(config, keying, incarnation, sock, counters).run(&cmds))
}

struct Forwarder {
    config: ForwarderConfig,
    sock: UdpSocket,
    counters: Arc<Counters>,
    streams: HashMap<u32, StreamState>,
    batch: RecvBatch,
    plan: Vec<(Out, SocketAddr)>,
    data_port: u16,
    cache: StartCache,
    keying: Keying,
    gate: ControlGate,
    sender: ControlSender,
}

impl Forwarder {
    fn new(
        config: ForwarderConfig,
        keying: Keying,
        incarnation: u64,
        sock: UdpSocket,
        counters: Arc<Counters>,
    ) -> Self {
        let data_port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
        Self {
            gate: keying.gate(),
            sender: keying.sealer("data", incarnation),
            keying,
            config,
            sock,
            counters,
            streams: HashMap::new(),
            batch: RecvBatch::new(BATCH),
            plan: Vec::with_capacity(BATCH * 4),
            data_port,
            cache: StartCache::new(),
        }
    }

    fn run(mut self, cmds: &Receiver<DataCmd>) {
        loop {
            loop {
                match cmds.try_recv() {
                    Ok(DataCmd::Route { stream, children }) => {
                        let st = self.streams.entry(stream).or_insert_with(StreamState::new);
                        let new = gop_cache::added(&st.children, &children);
                        st.traffic.children = children.len();
                        st.strip = children
                            .iter()
                            .map(|c| !self.keying.is_member(*c))
                            .collect();
                        st.children = children;
                        if !new.is_empty() {
                            let replay = self.cache.replay(Instant::now(), stream);
                            for child in new {
                                let strip = !self.keying.is_member(child);
                                self.plan.extend(
                                    replay.iter().map(|d| (Out::Media(d.clone(), strip), child)),
                                );
                            }
                        }
                    }
                    Ok(DataCmd::Snapshot(reply)) => {
                        let snap = self
                            .streams
                            .iter()
                            .map(|(k, v)| {
                                let mut t = v.traffic.clone();
                                t.given_up = v.gaps.stats().given_up;
                                (*k, t)
                            })
                            .collect();
                        let _ = reply.send(snap);
                    }
                    Ok(DataCmd::Stop) | Err(TryRecvError::Disconnected) => return,
                    Err(TryRecvError::Empty) => break,
                }
            }
            match self.batch.recv(&self.sock) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    // ICMP errors of an earlier send surface here on Linux: count, go on.
                    tracing::debug!(error = %e, "data socket receive error");
                    add(&self.counters.send_errors, 1);
                }
            }
            let now = Instant::now();
            for i in 0..self.batch.len() {
                self.on_datagram(now, i);
            }
            if self.config.nack {
                self.poll_nacks(now);
            }
            self.flush();
        }
    }

    fn on_datagram(&mut self, now: Instant, i: usize) {
        let Some((datagram, from)) = self.batch.get(i) else {
            return;
        };
        self.counters.rx(datagram.len());
        if datagram.len() < HEADER_LEN || datagram[..2] != MAGIC {
            // Not media: a NACK from a child, or garbage.
            match (self.gate.open(from, datagram), from) {
                (Ok(Message::Nack { stream, ranges, .. }), Some(from)) => {
                    self.on_nack(stream, &ranges, from)
                }
                (Ok(other), _) => {
                    tracing::debug!(kind = other.kind(), "unexpected message on the data socket");
                    add(&self.counters.dropped, 1);
                }
                (Err(Refused::Auth(why)), _) => {
                    tracing::debug!(?from, %why, "data socket: overlay key check failed");
                    add(&self.counters.auth_failed, 1);
                }
                (Err(Refused::Malformed(e)), _) => {
                    tracing::debug!(error = %e, "malformed datagram on the data socket");
                    add(&self.counters.malformed, 1);
                }
            }
            return;
        }
        // With a key, the tag is checked before anything else is read.
        let untagged = match self.keying.open_media(datagram) {
            Ok(len) => len,
            Err(e) => {
                tracing::debug!(?from, error = %e, "media datagram: overlay key check failed");
                add(&self.counters.auth_failed, 1);
                return;
            }
        };
        let header = match MediaHeader::parse(&datagram[..untagged]) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = %e, "malformed media datagram");
                add(&self.counters.malformed, 1);
                return;
            }
        };
        let st = self
            .streams
            .entry(header.stream)
            .or_insert_with(StreamState::new);
        st.traffic.packets_in += 1;
        match st.seen.accept(header.seq, now) {
            Verdict::New => {}
            Verdict::Switched => {
                // Another server's copy: its sequence numbers are unrelated to the old.
                tracing::info!(stream = header.stream, "stream source changed");
                self.cache.forget(header.stream);
                st.gaps = GapTracker::new(NackConfig::default());
                st.buffer = RetransmitBuffer::new(RETRANSMIT_DEPTH);
            }
            Verdict::Duplicate => {
                st.traffic.duplicates += 1;
                add(&self.counters.duplicates, 1);
                return;
            }
            Verdict::OtherSource => {
                // A second server's copy during a brief overlap: one source at a time.
                add(&self.counters.dropped, 1);
                return;
            }
        }
        if !header.has(flags::RETRANSMIT) && from.is_some() && st.upstream != from {
            st.upstream = from;
            // Its tag verified: a member's address, which our NACKs are sealed for.
            if let Some(f) = from {
                self.keying.learn(f);
            }
        }
        if self.config.nack {
            st.gaps.on_datagram(now, header.seq);
        }
        // One copy per datagram (not per child), shared by the retransmission buffer and
        // the instant-start cache; a resend is flagged when it is made.
        let copy = Bytes::copy_from_slice(datagram);
        self.cache.observe(now, &header, &copy);
        st.buffer.insert(header.seq, copy);
        if st.children.is_empty() {
            add(&self.counters.dropped, 1);
            return;
        }
        for (child, strip) in st.children.iter().zip(&st.strip) {
            self.plan.push((Out::Batch(i, *strip), *child));
        }
        st.traffic.packets_out += st.children.len() as u64;
    }

    fn on_nack(&mut self, stream: u32, ranges: &[ott_proto::NackRange], from: SocketAddr) {
        let Some(st) = self.streams.get_mut(&stream) else {
            add(&self.counters.dropped, 1);
            return;
        };
        // Only children may ask: no one can use us to reflect traffic elsewhere.
        if !st.children.contains(&from) {
            add(&self.counters.dropped, 1);
            return;
        }
        let strip = !self.keying.is_member(from);
        for seq in nacked_seqs(ranges, MAX_RESEND_PER_NACK) {
            if let Some(d) = st.buffer.get(seq) {
                self.plan.push((Out::Media(retransmission(d), strip), from));
                st.traffic.retransmitted += 1;
                add(&self.counters.retransmitted, 1);
            }
        }
    }

    fn poll_nacks(&mut self, now: Instant) {
        for (id, st) in &mut self.streams {
            let Some(up) = st.upstream else { continue };
            while let Some(ranges) = st.gaps.poll_nack(now) {
                let msg = Message::Nack {
                    stream: *id,
                    data_port: self.data_port,
                    ranges,
                };
                match self.sender.encode(up, &msg) {
                    Ok(buf) => {
                        self.plan.push((Out::Control(Bytes::from(buf)), up));
                        st.traffic.nacks_sent += 1;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot encode a NACK"),
                }
            }
        }
    }

    fn flush(&mut self) {
        if self.plan.is_empty() {
            return;
        }
        let batch = &self.batch;
        // A viewer gets media without the overlay key's tag (only keyed media is stripped).
        let media = |d: &'_ [u8], strip: bool| -> usize {
            if strip && self.keying.key().is_some() {
                d.len().saturating_sub(ott_proto::auth::TAG_LEN)
            } else {
                d.len()
            }
        };
        let items: Vec<(&[u8], SocketAddr)> = self
            .plan
            .iter()
            .filter_map(|(out, to)| match out {
                Out::Batch(i, strip) => batch.get(*i).map(|(d, _)| (&d[..media(d, *strip)], *to)),
                Out::Media(b, strip) => Some((&b[..media(b, *strip)], *to)),
                Out::Control(b) => Some((b.as_ref(), *to)),
            })
            .collect();
        let out = send_batch(&self.sock, &items);
        add(&self.counters.packets_out, out.sent as u64);
        add(&self.counters.bytes_out, out.bytes as u64);
        if out.failed > 0 {
            tracing::debug!(failed = out.failed, "media sends failed");
            add(&self.counters.send_errors, out.failed as u64);
        }
        self.plan.clear();
    }
}

/// A copy of `datagram` flagged as a retransmission.
pub fn retransmission(datagram: &[u8]) -> Bytes {
    let mut d = datagram.to_vec();
    MediaHeader::mark_retransmit(&mut d);
    Bytes::from(d)
}

/// Ask the forwarding thread for its per-stream traffic (empty if it does not answer in time).
pub fn snapshot(cmds: &Sender<DataCmd>) -> DataSnapshot {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if cmds.send(DataCmd::Snapshot(tx)).is_err() {
        return DataSnapshot::new();
    }
    rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default()
}
