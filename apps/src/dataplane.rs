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
use ott_proto::auth::SessionKey;

/// Datagrams read per system call.
pub const BATCH: usize = 64;
/// Datagrams of each stream kept for retransmission (about 3 MB at full size).
pub const RETRANSMIT_DEPTH: usize = 2048;
/// Most datagrams resent for one NACK.
pub const MAX_RESEND_PER_NACK: usize = 256;
/// Most streams with forwarding state (routes past it are refused and counted in
/// `stream_cap`).
pub const MAX_STREAMS: usize = 256;
/// Retransmission budget of each child: bytes per second...
pub const RESEND_BYTES_PER_SEC: u64 = 4 << 20;
/// ...and the most it may save up (a burst).
pub const RESEND_BURST_BYTES: u64 = 1 << 20;

/// Commands from the control loop to the forwarding thread.
#[derive(Debug)]
pub enum DataCmd {
    /// Replace the children of a stream.
    Route {
        /// The stream.
        stream: u32,
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
    /// Milliseconds since the last (non-resent) media datagram, if any came.
    pub idle_ms: Option<u64>,
}

/// Per-stream traffic, keyed by stream id.
pub type DataSnapshot = HashMap<u32, StreamTraffic>;

/// A token bucket of bytes, refilled at [`RESEND_BYTES_PER_SEC`] up to
/// [`RESEND_BURST_BYTES`]: what a child may get in retransmissions.
#[derive(Debug, Clone, Copy)]
struct Budget {
    tokens: u64,
    at: Instant,
}

impl Budget {
    fn new(now: Instant) -> Self {
        Self {
            tokens: RESEND_BURST_BYTES,
            at: now,
        }
    }

    /// Take `n` bytes if the budget allows.
    fn take(&mut self, now: Instant, n: u64) -> bool {
        let elapsed = now.saturating_duration_since(self.at);
        let refill = (elapsed.as_micros() as u64).saturating_mul(RESEND_BYTES_PER_SEC) / 1_000_000;
        if refill > 0 {
            self.tokens = self.tokens.saturating_add(refill).min(RESEND_BURST_BYTES);
            self.at = now;
        }
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// How a datagram goes to one child.
#[derive(Debug, Clone)]
enum Dest {
    /// As received (an overlay member, or anyone without an overlay key).
    Same,
    /// Without the overlay key's tag (a child that is no member, without a session).
    Strip,
    /// A viewer: without the overlay tag, with its session's tag.
    Session(SessionKey),
}

struct StreamState {
    children: Vec<SocketAddr>,
    /// Per child: how it gets the media.
    dests: Vec<Dest>,
    /// Per child: its retransmission budget.
    budgets: HashMap<SocketAddr, Budget>,
    seen: StreamDedup,
    traffic: StreamTraffic,
    buffer: RetransmitBuffer,
    gaps: GapTracker,
    /// Where the stream comes from (the parent's data socket), for NACKs.
    upstream: Option<SocketAddr>,
    last_in: Option<Instant>,
}

impl StreamState {
    fn new() -> Self {
        Self {
            children: Vec::new(),
            dests: Vec::new(),
            budgets: HashMap::new(),
            seen: StreamDedup::default(),
            traffic: StreamTraffic::default(),
            buffer: RetransmitBuffer::new(RETRANSMIT_DEPTH),
            gaps: GapTracker::new(NackConfig::default()),
            upstream: None,
            last_in: None,
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
    /// Bytes ready to send (a viewer's copy with its session tag).
    Owned(Bytes),
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
                    Ok(DataCmd::Route {
                        stream,
                        children,
                        sessions,
                    }) => self.route(stream, children, sessions),
                    Ok(DataCmd::Snapshot(reply)) => {
                        let snap = self
                            .streams
                            .iter()
                            .map(|(k, v)| {
                                let mut t = v.traffic.clone();
                                t.given_up = v.gaps.stats().given_up;
                                t.idle_ms = v.last_in.map(|l| l.elapsed().as_millis() as u64);
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

    /// A new forwarding-table entry: state exists only for routed streams (at most
    /// [`MAX_STREAMS`]) and goes with the route.
    fn route(
        &mut self,
        stream: u32,
        children: Vec<SocketAddr>,
        sessions: Vec<(SocketAddr, SessionKey)>,
    ) {
        if children.is_empty() {
            self.streams.remove(&stream);
            self.cache.forget(stream);
            return;
        }
        if !self.streams.contains_key(&stream) && self.streams.len() >= MAX_STREAMS {
            tracing::warn!(
                stream,
                max = MAX_STREAMS,
                "stream cap reached: route refused"
            );
            add(&self.counters.stream_cap, 1);
            return;
        }
        let now = Instant::now();
        let st = self.streams.entry(stream).or_insert_with(StreamState::new);
        let new = gop_cache::added(&st.children, &children);
        st.traffic.children = children.len();
        let dest_of = |c: &SocketAddr| match sessions.iter().find(|(a, _)| a == c) {
            Some((_, k)) => Dest::Session(k.clone()),
            None if self.keying.is_member(*c) => Dest::Same,
            None => Dest::Strip,
        };
        st.dests = children.iter().map(dest_of).collect();
        st.budgets.retain(|a, _| children.contains(a));
        for c in &children {
            st.budgets.entry(*c).or_insert_with(|| Budget::new(now));
        }
        st.children = children;
        if !new.is_empty() {
            let replay = self.cache.replay(now, stream);
            for child in new {
                let dest = dest_of(&child);
                for d in &replay {
                    let out = self.out_for(d, &dest);
                    self.plan.push((out, child));
                }
            }
        }
    }

    /// An owned datagram (as received, overlay tag included when keyed) for `dest`.
    fn out_for(&self, d: &Bytes, dest: &Dest) -> Out {
        match dest {
            Dest::Same => Out::Media(d.clone(), false),
            Dest::Strip => Out::Media(d.clone(), true),
            Dest::Session(k) => Out::Owned(Bytes::from(k.seal(self.untagged(d)))),
        }
    }

    /// `d` without the overlay key's tag (as is without a key).
    fn untagged<'a>(&self, d: &'a [u8]) -> &'a [u8] {
        if self.keying.key().is_some() {
            &d[..d.len().saturating_sub(ott_proto::auth::TAG_LEN)]
        } else {
            d
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
                    self.on_nack(now, stream, &ranges, from)
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
        // Nothing is kept for a stream nobody here receives: no allocation at all.
        let Some(st) = self.streams.get_mut(&header.stream) else {
            add(&self.counters.unrouted, 1);
            return;
        };
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
        if !header.has(flags::RETRANSMIT) {
            st.last_in = Some(now);
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
        let body = &datagram[..untagged];
        for (child, dest) in st.children.iter().zip(&st.dests) {
            let out = match dest {
                Dest::Same => Out::Batch(i, false),
                Dest::Strip => Out::Batch(i, true),
                Dest::Session(k) => Out::Owned(Bytes::from(k.seal(body))),
            };
            self.plan.push((out, *child));
        }
        st.traffic.packets_out += st.children.len() as u64;
    }

    fn on_nack(
        &mut self,
        now: Instant,
        stream: u32,
        ranges: &[ott_proto::NackRange],
        from: SocketAddr,
    ) {
        let keyed = self.keying.key().is_some();
        let Some(st) = self.streams.get_mut(&stream) else {
            add(&self.counters.dropped, 1);
            return;
        };
        // Only children may ask: no one can use us to reflect traffic elsewhere.
        let Some(idx) = st.children.iter().position(|c| *c == from) else {
            add(&self.counters.dropped, 1);
            return;
        };
        let dest = st.dests.get(idx).cloned().unwrap_or(Dest::Strip);
        let asked: usize = ranges.iter().map(|r| usize::from(r.count)).sum();
        if asked > MAX_RESEND_PER_NACK {
            // The rest of a NACK past the cap is not answered.
            add(&self.counters.resend_budget, 1);
        }
        let budget = st.budgets.entry(from).or_insert_with(|| Budget::new(now));
        for seq in nacked_seqs(ranges, MAX_RESEND_PER_NACK) {
            let Some(d) = st.buffer.get(seq) else {
                continue;
            };
            // Each child's retransmissions are bounded in bytes per second.
            if !budget.take(now, d.len() as u64) {
                add(&self.counters.resend_budget, 1);
                break;
            }
            let resent = retransmission(d);
            let out = match &dest {
                Dest::Same => Out::Media(resent, false),
                Dest::Strip => Out::Media(resent, true),
                Dest::Session(k) => {
                    let body = if keyed {
                        &resent[..resent.len().saturating_sub(ott_proto::auth::TAG_LEN)]
                    } else {
                        &resent[..]
                    };
                    Out::Owned(Bytes::from(k.seal(body)))
                }
            };
            self.plan.push((out, from));
            st.traffic.retransmitted += 1;
            add(&self.counters.retransmitted, 1);
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
                Out::Control(b) | Out::Owned(b) => Some((b.as_ref(), *to)),
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
