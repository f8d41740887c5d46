//! The media forwarding thread of a relay or PoP: an I/O shell around the data-plane
//! core, [`ott_datapath::DataPath`].
//!
//! It reads media datagrams from the node's data socket in batches (`recvmmsg`), hands
//! each to the core (which checks the overlay tag before reading the header, drops
//! duplicates and other sources' copies, tracks gaps, keeps the retransmission buffer and
//! the start cache), and sends what the core queues in batches (`sendmmsg`): live data
//! goes to every child as the same bytes of the receive batch, without a copy per child.
//! The forwarding table is the core's, updated through [`DataCmd`]s from the control
//! loop, so the hot path takes no lock.
//!
//! NACKs from children arrive on this socket: this shell opens them with the overlay
//! key's control gate (members' NACKs must be sealed) and hands them to the core, which
//! answers only current children within their byte budgets. NACKs the core asks for go
//! upstream sealed. A failed send to one child is counted and never stops forwarding to
//! the others.
//!
//! With many children, a round's sends are split over a few sender threads by
//! destination ([`fanout`]): each child is always sent to by the same thread, and a
//! round is wholly handed to the kernel before the next batch is received, so no stream
//! is reordered to a child. Viewers' copies are sealed by the core before the round
//! reaches this shell, so the split changes who sends them, never what is sent.

pub mod fanout;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, TryRecvError};
use ott_datapath::{
    Child, Config, DataPath, DataPathCounters as CoreCounters, DataPathEvent as Event,
    Drop as DropReason, MediaIn, Payload, Transmit,
};
use ott_proto::auth::SessionKey;
use ott_proto::{MediaHeader, Message};

use crate::batch::{send_batch, RecvBatch};
use crate::counters::{add, Counters};
use crate::datacmd::{DataCmd, StreamTraffic};
use crate::keying::{ControlGate, ControlSender, Keying, Refused};

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

/// How each child of a route gets the media: a viewer with a session gets it sealed
/// with its session key; an overlay member as received; anyone else without the overlay
/// tag.
pub(crate) fn children_of(
    keying: &Keying,
    children: &[SocketAddr],
    sessions: &[(SocketAddr, SessionKey)],
) -> Vec<Child> {
    ott_datapath::children_from(children, sessions, |c| keying.is_member(c))
}

/// The core's limits for a forwarder.
pub(crate) fn core_config(config: ForwarderConfig) -> Config {
    Config {
        nack: config.nack,
        max_streams: MAX_STREAMS,
        retransmit_depth: RETRANSMIT_DEPTH,
        max_resend_per_nack: MAX_RESEND_PER_NACK,
        resend_bytes_per_sec: RESEND_BYTES_PER_SEC,
        resend_burst_bytes: RESEND_BURST_BYTES,
        ..Config::default()
    }
}

/// Options of the forwarding thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwarderConfig {
    /// NACK the upstream for missing datagrams (per-hop loss recovery). Answering
    /// children's NACKs is always on.
    pub nack: bool,
    /// Most threads that send a round's datagrams, the forwarding thread included (1:
    /// it sends everything itself). Never more than the cores the process may use
    /// ([`fanout::available_cores`]). Default: [`fanout::default_threads`].
    pub fanout_threads: usize,
    /// Fewest distinct destinations in one round for its sends to be split over the
    /// threads; below it the forwarding thread sends the round itself, with no thread
    /// hop. Default: [`fanout::DEFAULT_MIN_CHILDREN`].
    pub fanout_min_children: usize,
    /// ... and fewest sends (default [`fanout::MIN_SENDS`]).
    pub fanout_min_sends: usize,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        Self {
            nack: true,
            fanout_threads: fanout::default_threads(),
            fanout_min_children: fanout::DEFAULT_MIN_CHILDREN,
            fanout_min_sends: fanout::MIN_SENDS,
        }
    }
}

impl ForwarderConfig {
    /// The sender threads a forwarder with this configuration uses for a large round:
    /// `fanout_threads`, at most the cores available, at least 1.
    pub fn effective_fanout_threads(&self) -> usize {
        self.fanout_threads.clamp(1, fanout::available_cores())
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

/// The I/O shell around [`DataPath`]: batched socket reads and writes, control-message
/// gate and sealer, counters.
struct Forwarder {
    sock: UdpSocket,
    counters: Arc<Counters>,
    core: DataPath,
    /// The core's counters already added to `counters`.
    published: CoreCounters,
    /// The receive buffers, shared with the sender threads during a split round (and
    /// only then: see [`Forwarder::recv`]).
    batch: Arc<RecvBatch>,
    /// The core's transmits of one round (reused).
    plan: Vec<Transmit>,
    /// The transmits of a split round that this thread sends itself (reused).
    local: Vec<Transmit>,
    /// Spare buffer for the slices of a round (empty between rounds).
    refs: Vec<(&'static [u8], SocketAddr)>,
    /// The other sender threads.
    fanout: fanout::Fanout,
    /// Encoded NACKs of one round (reused).
    nacks: Vec<(usize, Vec<u8>)>,
    /// The core's drops of one run of media datagrams (reused).
    drops: Vec<(usize, DropReason)>,
    data_port: u16,
    keying: Keying,
    gate: ControlGate,
    sender: ControlSender,
    /// Names of the routed streams, for logs.
    names: std::collections::HashMap<u32, String>,
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
        let batch = Arc::new(RecvBatch::with_gro(BATCH, &sock));
        Self {
            gate: keying.gate(),
            sender: keying.sealer("data", incarnation),
            core: DataPath::new(core_config(config), keying.key().cloned()),
            published: CoreCounters::default(),
            keying,
            sock,
            counters,
            batch,
            plan: Vec::with_capacity(BATCH * 4),
            local: Vec::new(),
            refs: Vec::new(),
            fanout: fanout::Fanout::new(
                config.effective_fanout_threads(),
                config.fanout_min_children,
                config.fanout_min_sends,
            ),
            nacks: Vec::new(),
            drops: Vec::new(),
            data_port,
            names: std::collections::HashMap::new(),
        }
    }

    fn run(mut self, cmds: &Receiver<DataCmd>) {
        loop {
            loop {
                match cmds.try_recv() {
                    Ok(DataCmd::Route {
                        stream,
                        name,
                        children,
                        sessions,
                    }) => {
                        if children.is_empty() {
                            self.names.remove(&stream);
                        } else {
                            self.names.insert(stream, name.clone());
                        }
                        let children = children_of(&self.keying, &children, &sessions);
                        if !self.core.set_route(Instant::now(), stream, children) {
                            self.names.remove(&stream);
                            tracing::warn!(
                                stream = %name,
                                max = MAX_STREAMS,
                                "stream cap reached: route refused"
                            );
                        }
                    }
                    Ok(DataCmd::Snapshot(reply)) => {
                        let now = Instant::now();
                        let snap = self
                            .core
                            .streams()
                            .map(|(id, s)| {
                                let mut t = StreamTraffic::from(s);
                                t.idle_ms = s.last_live_in.map(|l| {
                                    u64::try_from(now.saturating_duration_since(l).as_millis())
                                        .unwrap_or(u64::MAX)
                                });
                                (id, t)
                            })
                            .collect();
                        let _ = reply.send(snap);
                    }
                    Ok(DataCmd::Stop) | Err(TryRecvError::Disconnected) => return,
                    Err(TryRecvError::Empty) => break,
                }
            }
            match self.recv() {
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
            self.on_batch(now);
            self.core.handle_timeout(now);
            while let Some(ev) = self.core.poll_event() {
                match ev {
                    // Its tag verified: a member's address, which our NACKs are sealed for.
                    Event::Upstream { from, .. } => self.keying.learn(from),
                    Event::SourceSwitched { stream } => {
                        let name = self.names.get(&stream).map_or("?", String::as_str);
                        tracing::info!(stream = %name, "stream source changed");
                    }
                }
            }
            self.flush();
            self.publish();
        }
    }

    /// The datagrams of the last receive: each run of media datagrams goes to the core
    /// in one call (its tags are checked together), NACKs in between one by one, all in
    /// the order received.
    fn on_batch(&mut self, now: Instant) {
        let Self {
            batch,
            core,
            counters,
            gate,
            drops,
            ..
        } = self;
        let mut media: Vec<MediaIn<'_>> = Vec::with_capacity(batch.len());
        let (mut packets, mut bytes) = (0u64, 0u64);
        for i in 0..batch.len() {
            let Some((datagram, from)) = batch.get(i) else {
                continue;
            };
            packets += 1;
            bytes += datagram.len() as u64;
            if ott_datapath::is_media(datagram) {
                media.push(MediaIn {
                    from,
                    datagram,
                    token: i,
                });
                continue;
            }
            // Not media: a NACK from a child, or garbage. The media before it first.
            media_run(core, now, &mut media, drops);
            match (gate.open(from, datagram), from) {
                (Ok(Message::Nack { stream, ranges, .. }), Some(from)) => {
                    core.handle_nack(now, from, stream, &ranges)
                }
                (Ok(other), _) => {
                    tracing::debug!(kind = other.kind(), "unexpected message on the data socket");
                    add(&counters.dropped, 1);
                }
                (Err(Refused::Auth(why)), _) => {
                    tracing::debug!(?from, %why, "data socket: overlay key check failed");
                    add(&counters.auth_failed, 1);
                }
                (Err(Refused::Malformed(e)), _) => {
                    tracing::debug!(error = %e, "malformed datagram on the data socket");
                    add(&counters.malformed, 1);
                }
            }
        }
        media_run(core, now, &mut media, drops);
        if packets > 0 {
            add(&counters.packets_in, packets);
            add(&counters.bytes_in, bytes);
        }
    }

    /// Receive the next batch. Every round is sent in full before this is called, so
    /// no sender thread holds the buffers any more; if one did (a helper that died
    /// mid-round), fresh buffers take their place.
    fn recv(&mut self) -> std::io::Result<usize> {
        if Arc::get_mut(&mut self.batch).is_none() {
            tracing::warn!("receive buffers still shared: new ones allocated");
            self.batch = Arc::new(RecvBatch::with_gro(BATCH, &self.sock));
        }
        match Arc::get_mut(&mut self.batch) {
            Some(b) => b.recv(&self.sock),
            None => Ok(0),
        }
    }

    /// Add what the core counted since the last call to the node's counters.
    fn publish(&mut self) {
        publish(&self.counters, &mut self.published, self.core.counters());
    }

    /// Send the round the core queued: from this thread alone, or split by destination
    /// over the sender threads when it reaches enough children ([`fanout`]).
    fn flush(&mut self) {
        self.plan.extend(self.core.drain_transmits());
        if self.plan.is_empty() {
            return;
        }
        let split = self
            .fanout
            .splits(&self.sock, self.plan.iter().map(|t| t.to));
        if split {
            // The helpers' shares leave the plan (their `Bytes` moved, not copied);
            // what stays is this thread's share and the NACKs upstream.
            for t in self.plan.drain(..) {
                let thread = match t.payload {
                    Payload::Nack { .. } => 0,
                    _ => self.fanout.sender_of(&t.to),
                };
                let d = match t.payload {
                    Payload::Input { token, len } if thread > 0 => {
                        fanout::Datagram::Input { token, len }
                    }
                    Payload::Bytes(b) if thread > 0 => fanout::Datagram::Bytes(b),
                    payload => {
                        self.local.push(Transmit { to: t.to, payload });
                        continue;
                    }
                };
                self.fanout.push(thread, d, t.to);
            }
            std::mem::swap(&mut self.plan, &mut self.local);
            self.fanout.dispatch(&self.sock, &self.batch);
        }
        self.nacks.clear();
        for (i, t) in self.plan.iter().enumerate() {
            if let Payload::Nack { stream, ranges } = &t.payload {
                let msg = Message::Nack {
                    stream: *stream,
                    data_port: self.data_port,
                    ranges: ranges.clone(),
                };
                match self.sender.encode(t.to, &msg) {
                    Ok(buf) => self.nacks.push((i, buf)),
                    Err(e) => tracing::warn!(error = %e, "cannot encode a NACK"),
                }
            }
        }
        let batch = &*self.batch;
        let nacks = &self.nacks;
        let mut items = fanout::recycle(std::mem::take(&mut self.refs));
        items.extend(self.plan.iter().enumerate().filter_map(|(i, t)| {
            match &t.payload {
                Payload::Input { token, len } => batch
                    .get(*token)
                    .and_then(|(d, _)| d.get(..*len))
                    .map(|d| (d, t.to)),
                Payload::Bytes(b) => Some((b.as_ref(), t.to)),
                Payload::Nack { .. } => nacks
                    .iter()
                    .find(|(j, _)| *j == i)
                    .map(|(_, b)| (b.as_slice(), t.to)),
            }
        }));
        let mut out = send_batch(&self.sock, &items);
        self.refs = fanout::recycle(items);
        if split {
            out.add(self.fanout.wait());
        }
        add(&self.counters.packets_out, out.sent as u64);
        add(&self.counters.bytes_out, out.bytes as u64);
        if out.failed > 0 {
            tracing::debug!(failed = out.failed, "media sends failed");
            add(&self.counters.send_errors, out.failed as u64);
        }
        self.plan.clear();
    }
}

/// Hand a run of media datagrams to the core, and empty it.
fn media_run(
    core: &mut DataPath,
    now: Instant,
    media: &mut Vec<MediaIn<'_>>,
    drops: &mut Vec<(usize, DropReason)>,
) {
    if media.is_empty() {
        return;
    }
    core.handle_media_batch(now, media, drops);
    for &(i, why) in drops.iter() {
        if matches!(why, DropReason::Auth | DropReason::Malformed) {
            let from = media.get(i).and_then(|m| m.from);
            tracing::debug!(?from, ?why, "media datagram refused");
        }
    }
    media.clear();
}

/// Add what a core counted since `was` (then set to `now`) to the node's counters.
pub(crate) fn publish(c: &Counters, was: &mut CoreCounters, now: CoreCounters) {
    let was = std::mem::replace(was, now);
    add(&c.auth_failed, now.auth_failed - was.auth_failed);
    add(&c.malformed, now.malformed - was.malformed);
    add(&c.unrouted, now.unrouted - was.unrouted);
    add(&c.duplicates, now.duplicates - was.duplicates);
    add(&c.stream_cap, now.stream_cap - was.stream_cap);
    add(&c.resend_budget, now.resend_budget - was.resend_budget);
    add(&c.retransmitted, now.retransmitted - was.retransmitted);
    add(&c.other_source, now.other_source - was.other_source);
    add(&c.child_cap, now.child_cap - was.child_cap);
    add(&c.nacks_refused, now.nacks_refused - was.nacks_refused);
    add(
        &c.dropped,
        (now.other_source - was.other_source) + (now.nacks_refused - was.nacks_refused),
    );
}

/// A copy of `datagram` flagged as a retransmission.
pub fn retransmission(datagram: &[u8]) -> Bytes {
    let mut d = datagram.to_vec();
    MediaHeader::mark_retransmit(&mut d);
    Bytes::from(d)
}
