//! Neighbour liveness and link RTT, by periodic heartbeats (sans-IO).
//!
//! [`Neighbours`] keeps the table of a node's overlay neighbours. Every
//! [`LivenessConfig::heartbeat_interval`] it sends a [`Message::Heartbeat`] to each of them;
//! each heartbeat is answered with a [`Message::HeartbeatAck`] that echoes the sender's
//! timestamp, so the round-trip time is `now - echo` on the sender's own clock and no two
//! clocks are ever compared. A neighbour is alive from the first heartbeat or ack heard
//! from it, and dead once silent for [`LivenessConfig::dead_after`] or at once when it says
//! [`Message::Bye`].
//!
//! # Identity
//!
//! A neighbour is known by the addresses the bootstrapper gave for it ([`PeerAddrs`]),
//! and only by them: a liveness message counts only when it comes from one of them and
//! names the neighbour they belong to. Nothing is learned from messages (no aliases),
//! and nothing is ever sent to an address that is not a neighbour's: a heartbeat from a
//! stranger is counted ([`Neighbours::unknown_sender_count`]) and not answered.
//!
//! A neighbour's incarnation (which tells a restart) moves only when the messages are
//! authenticated ([`LivenessConfig::keyed`]), or after the neighbour was silent for
//! `dead_after`: then the next message from its addresses starts it afresh, whatever its
//! incarnation. Without a key, a forged heartbeat (even with incarnation 2^64 - 1 from
//! the neighbour's own address) therefore neither marks it restarted nor makes its
//! real messages look stale; a restarted neighbour is recognised at most `dead_after`
//! after its old incarnation fell silent.
//!
//! Drain rule: after each call to [`Neighbours::new`], [`Neighbours::handle`],
//! [`Neighbours::handle_timeout`] or [`Neighbours::shutdown`], drain
//! [`Neighbours::poll_transmit`] and [`Neighbours::poll_event`], then read
//! [`Neighbours::poll_timeout`] and call `handle_timeout` when it is reached.
//!
//! This module never reads the clock nor touches a socket: `now` is always a parameter.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ott_proto::Message;

use crate::addr::PeerAddrs;

/// A control message to send to one address.
#[must_use]
#[derive(Debug, Clone, PartialEq)]
pub struct ControlTransmit {
    /// Destination (the peer's control address).
    pub to: SocketAddr,
    /// The message.
    pub msg: Message,
}

/// The smoothed RTT of a neighbour moves by 1/n of each new sample, n being this
/// span over the heartbeat interval (8 samples at 100 ms, 16 at the default 50 ms).
const RTT_SMOOTHING: Duration = Duration::from_millis(800);

/// Timing of heartbeats and death detection.
///
/// The defaults (a heartbeat every 50 ms, dead after 200 ms of silence) detect a crashed
/// neighbour in at most 200 ms, so that every neighbour of a dead relay, not only the
/// one its media went to, routes around it within the 300 ms a viewer's playout buffer
/// bridges, while a neighbour is only declared dead after about eight messages in a row
/// from it were lost (its heartbeats and its answers to ours): with 5 % random loss that
/// happens about once a day per neighbour. Each node sends `2 / heartbeat_interval`
/// liveness messages per second per neighbour (heartbeats and acks), 40 with the
/// defaults (each about 40 bytes).
///
/// A neighbour that came back from a silence is given twice that silence (at most four
/// times `dead_after`) for the next 10 s: on a host or link that stalls now and then
/// (an overloaded machine, an emulator starved of CPU) a stall is not taken for a
/// death each time, while a steady neighbour's crash is seen at the configured speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    /// Period of heartbeats to each neighbour (default 50 ms).
    pub heartbeat_interval: Duration,
    /// A neighbour silent for this long is declared dead (default 200 ms).
    pub dead_after: Duration,
    /// Every message handed to [`Neighbours::handle`] passed a MAC check with the
    /// overlay key (default false). Then a neighbour's incarnation moves as soon as it
    /// grows (a restart is recognised at once); without a key it moves only after
    /// `dead_after` of silence (see the module docs).
    pub keyed: bool,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(50),
            dead_after: Duration::from_millis(200),
            keyed: false,
        }
    }
}

impl LivenessConfig {
    /// A configuration with these timings; both are raised to at least 1 ms, and
    /// `dead_after` to at least one heartbeat interval, so that no setting can make a
    /// node spin or declare every neighbour dead between two heartbeats.
    pub fn new(heartbeat_interval: Duration, dead_after: Duration) -> Self {
        let heartbeat_interval = heartbeat_interval.max(Duration::from_millis(1));
        Self {
            heartbeat_interval,
            dead_after: dead_after.max(heartbeat_interval),
            keyed: false,
        }
    }
}

/// A change in the state of a neighbour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NeighbourEvent {
    /// The neighbour was heard from after being unknown or dead.
    Up(String),
    /// The neighbour went silent for `dead_after`, or said `Bye`.
    Down(String),
    /// The neighbour came back with another incarnation: it restarted and lost its state.
    Restarted(String),
}

/// A snapshot of one neighbour, from [`Neighbours::iter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourInfo {
    /// Node id.
    pub id: String,
    /// Control address we were given for it.
    pub addr: SocketAddr,
    /// Whether it is currently considered alive.
    pub alive: bool,
    /// Smoothed round-trip time, once measured.
    pub rtt: Option<Duration>,
    /// Its incarnation, once heard from.
    pub incarnation: Option<u64>,
    /// Heartbeats sent to it since the start.
    pub heartbeats_sent: u64,
    /// Of those, heartbeats it acknowledged (each counted once).
    pub heartbeats_acked: u64,
    /// Heartbeats of the loss window ([`LOSS_WINDOW`]) that count (two later ones were
    /// sent since) and, of those, how many were not acknowledged.
    pub window: (u32, u32),
}

impl NeighbourInfo {
    /// The fraction of the last heartbeats to this neighbour that were not
    /// acknowledged, 0..=1, over up to [`LOSS_WINDOW`] of them; `None` before any
    /// counts. A heartbeat counts once two later ones were sent (its ack had two
    /// heartbeat intervals to come back), so a neighbour that stops answering reaches
    /// 1 after [`LOSS_WINDOW`] intervals.
    pub fn loss_ratio(&self) -> Option<f64> {
        let (counted, lost) = self.window;
        (counted > 0).then(|| f64::from(lost) / f64::from(counted))
    }
}

/// Heartbeats per neighbour remembered for [`NeighbourInfo::loss_ratio`].
pub const LOSS_WINDOW: usize = 50;
/// The newest heartbeats left out of the loss ratio: their acks may still be on the way.
const IN_FLIGHT: usize = 2;

const _: () = assert!(LOSS_WINDOW <= 64 && IN_FLIGHT < LOSS_WINDOW);

/// Neighbours whose entries [`Neighbours::prefetch`] brings in (most nodes of an
/// overlay have fewer).
const PREFETCHED_PEERS: usize = 6;

/// The last heartbeats sent to one neighbour (at most [`LOSS_WINDOW`]) and which were
/// acknowledged. Every heartbeat goes to every neighbour, so each neighbour's window is
/// consecutive seqs ending at the table's newest: a length and one bit per heartbeat
/// (bit `k` for the newest seq minus `k`) say it all, inside the neighbour's entry
/// (an ack then reads no memory of its own).
#[derive(Debug, Clone, Copy, Default)]
struct LossWindow {
    len: u8,
    acked: u64,
}

impl LossWindow {
    /// A new heartbeat was sent (the table's newest seq moved on by one).
    fn push(&mut self) {
        self.acked = (self.acked << 1) & ((1u64 << LOSS_WINDOW) - 1);
        self.len = (self.len + 1).min(LOSS_WINDOW as u8);
    }

    /// Mark heartbeat `seq` acknowledged, `newest` being the last seq sent; whether it
    /// was in the window and not acknowledged yet.
    fn ack(&mut self, newest: u64, seq: u64) -> bool {
        let Some(k) = newest.checked_sub(seq) else {
            return false;
        };
        if k >= u64::from(self.len) {
            return false;
        }
        let bit = 1u64 << k;
        let fresh = self.acked & bit == 0;
        self.acked |= bit;
        fresh
    }

    /// Heartbeats that count for the loss ratio (all but the [`IN_FLIGHT`] newest) and,
    /// of those, how many were not acknowledged.
    fn counted_and_lost(&self) -> (u32, u32) {
        let counted = usize::from(self.len).saturating_sub(IN_FLIGHT);
        let acked = (self.acked >> IN_FLIGHT) & ((1u64 << counted) - 1);
        (counted as u32, counted as u32 - acked.count_ones())
    }
}

/// A compact key of a node id, so that finding a neighbour by id compares one integer
/// per neighbour: an id of up to 15 bytes is its own key (its bytes and its length, so
/// equal keys are equal ids and the neighbour's id, elsewhere in memory, is not read);
/// a longer one is keyed by a hash of its bytes, and a match is confirmed by comparing
/// the ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IdKey(u128);

/// Longest id that is its own [`IdKey`].
const INLINE_ID: usize = 15;

impl IdKey {
    fn of(id: &str) -> Self {
        let bytes = id.as_bytes();
        if bytes.len() <= INLINE_ID {
            let mut w = [0u8; 16];
            w[..bytes.len()].copy_from_slice(bytes);
            // The length in the top byte: "a" and "a\0" differ.
            w[15] = bytes.len() as u8;
            return Self(u128::from_le_bytes(w));
        }
        let mix = |h: u64, w: u64| (h.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        let mut chunks = bytes.chunks_exact(8);
        let mut h = bytes.len() as u64;
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            h = mix(h, u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            h = mix(h, u64::from_le_bytes(w));
        }
        // Top byte 0xff: never an inline id's (their top byte is a length up to 15).
        Self(u128::from(h) | (0xff << 120))
    }

    /// Whether `peer` (with key `self`) is `id` (with key `key`).
    fn matches(self, peer: &str, key: Self, id: &str) -> bool {
        self == key && ((self.0 >> 120) as usize <= INLINE_ID || peer == id)
    }
}

#[derive(Debug, Clone)]
struct Peer {
    addrs: PeerAddrs,
    alive: bool,
    srtt: Option<Duration>,
    /// Mean deviation of the RTT samples from `srtt` (RFC 6298 RTTVAR, beta 1/4): it
    /// follows a change in the link's jitter within a few heartbeats.
    rttvar: Duration,
    /// `rttvar` scaled to the wander of `srtt` itself (see
    /// [`Neighbours::rtt_and_spread_if_alive`]), updated with each sample.
    spread: Duration,
    incarnation: Option<u64>,
    last_heard: Option<Instant>,
    /// The longest silence it came back from while alive, and when it ended: for
    /// [`GAP_MEMORY`] the neighbour is declared dead only after twice that silence.
    survived: Option<(Duration, Instant)>,
    /// The last heartbeats sent to it (seq, acknowledged), oldest first.
    window: LossWindow,
    hb_sent: u64,
    hb_acked: u64,
}

/// How long a neighbour's longest survived silence is remembered.
const GAP_MEMORY: Duration = Duration::from_secs(10);

impl Peer {
    /// How long a silence makes this neighbour dead at `now`: the configured time, or
    /// twice the longest silence it came back from within [`GAP_MEMORY`], at most four
    /// times the configured time (a loaded host or link that stalls now and then is not
    /// taken for dead at each stall; a steady one is detected at the configured speed).
    fn dead_after(&self, config: &LivenessConfig, now: Instant) -> Duration {
        match self.survived {
            Some((gap, at)) if now.saturating_duration_since(at) < GAP_MEMORY => {
                config.dead_after.max((gap * 2).min(config.dead_after * 4))
            }
            _ => config.dead_after,
        }
    }
}

/// Number of recent heartbeats remembered to validate echoed timestamps.
const SENT_HISTORY: usize = 16;

/// The neighbour table of one node: liveness and smoothed RTT of each neighbour.
#[derive(Debug, Clone)]
pub struct Neighbours {
    own_id: String,
    incarnation: u64,
    epoch: Instant,
    config: LivenessConfig,
    peers: Vec<Peer>,
    /// [`IdKey`] of each peer, at its position in `peers`: finding a neighbour by id
    /// (several times per input) reads these 16 bytes each, side by side, instead of a
    /// cache line of each neighbour.
    keys: Vec<IdKey>,
    /// When each peer, alive, would be declared dead if not heard from again
    /// ([`Neighbours::sync_peer`]), at its position in `peers`:
    /// [`Neighbours::poll_timeout`] runs after every input and reads these instead of
    /// every neighbour.
    dead_at: Vec<Option<Instant>>,
    /// Each peer's (smoothed RTT, spread) while alive and measured, at its position in
    /// `peers` (kept by [`Neighbours::sync_peer`] too): the parent choice reads
    /// every neighbour's after every input.
    rtts: Vec<Option<(Duration, Duration)>>,
    next_heartbeat: Instant,
    hb_seq: u64,
    sent: VecDeque<(u64, u64)>,
    transmits: VecDeque<ControlTransmit>,
    events: VecDeque<NeighbourEvent>,
    unknown: u64,
    refused_incarnations: u64,
    shut: bool,
    /// No neighbour is declared dead before this instant: this node itself was not
    /// run for a while (see [`Neighbours::handle_timeout`]).
    grace_until: Option<Instant>,
    /// Deaths put off because this node was late.
    stalls: u64,
}

impl Neighbours {
    /// A table of `peers` (id, control address), all initially not alive: each
    /// neighbour with a single address. See [`Neighbours::with_peers`].
    ///
    /// The first round of heartbeats is queued at once. `epoch` is the origin of this
    /// node's wire timestamps; `incarnation` must grow at each restart of the node.
    pub fn new(
        own_id: String,
        incarnation: u64,
        epoch: Instant,
        config: LivenessConfig,
        peers: Vec<(String, SocketAddr)>,
        now: Instant,
    ) -> Self {
        let peers = peers.into_iter().map(PeerAddrs::from).collect();
        Self::with_peers(own_id, incarnation, epoch, config, peers, now)
    }

    /// A table of `peers` as the bootstrapper gave them, all initially not alive: each
    /// one's id, the control address to send to and every control address it may send
    /// from ([`PeerAddrs`]). Otherwise as [`Neighbours::new`].
    pub fn with_peers(
        own_id: String,
        incarnation: u64,
        epoch: Instant,
        config: LivenessConfig,
        peers: Vec<PeerAddrs>,
        now: Instant,
    ) -> Self {
        let peers = peers
            .into_iter()
            .map(|addrs| Peer {
                addrs,
                alive: false,
                srtt: None,
                rttvar: Duration::ZERO,
                spread: Duration::ZERO,
                survived: None,
                incarnation: None,
                last_heard: None,
                window: LossWindow::default(),
                hb_sent: 0,
                hb_acked: 0,
            })
            .collect::<Vec<Peer>>();
        let keys = peers.iter().map(|p| IdKey::of(&p.addrs.id)).collect();
        let dead_at = vec![None; peers.len()];
        let rtts = vec![None; peers.len()];
        let mut me = Self {
            own_id,
            incarnation,
            epoch,
            config,
            peers,
            keys,
            dead_at,
            rtts,
            next_heartbeat: now,
            hb_seq: 0,
            sent: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            unknown: 0,
            refused_incarnations: 0,
            shut: false,
            grace_until: None,
            stalls: 0,
        };
        me.send_heartbeats(now);
        me
    }

    /// This node's id.
    pub fn own_id(&self) -> &str {
        &self.own_id
    }

    /// This node's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Microseconds since this node's epoch (the wire timestamp of `now`).
    pub fn micros(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    fn find(&self, id: &str) -> Option<&Peer> {
        self.peers.get(self.index_of(id)?)
    }

    /// Position of the neighbour owning `addr`: the first whose preferred address it is,
    /// else the first listing it among its addresses.
    fn position_of(&self, addr: SocketAddr) -> Option<usize> {
        self.peers
            .iter()
            .position(|p| p.addrs.preferred == addr)
            .or_else(|| self.peers.iter().position(|p| p.addrs.all.contains(&addr)))
    }

    /// The id of the neighbour that `addr` belongs to (one of the addresses the
    /// bootstrapper gave for it), if any.
    pub fn id_of(&self, addr: SocketAddr) -> Option<&str> {
        self.position_of(addr)
            .and_then(|i| self.peers.get(i))
            .map(|p| p.addrs.id.as_str())
    }

    /// The control address to send to neighbour `id` (its preferred address).
    pub fn addr_of(&self, id: &str) -> Option<SocketAddr> {
        self.find(id).map(|p| p.addrs.preferred)
    }

    /// Whether `id` is a neighbour currently alive.
    pub fn is_alive(&self, id: &str) -> bool {
        self.find(id).is_some_and(|p| p.alive)
    }

    /// When neighbour `id` was last heard from (a heartbeat or an acknowledgement from
    /// one of its addresses), if ever.
    pub fn last_heard(&self, id: &str) -> Option<Instant> {
        self.find(id).and_then(|p| p.last_heard)
    }

    /// [`Neighbours::rtt`] of `id` if it is also [`Neighbours::is_alive`]: one lookup
    /// for the two questions a parent choice asks of every offer.
    pub fn rtt_if_alive(&self, id: &str) -> Option<Duration> {
        self.find(id).filter(|p| p.alive).and_then(|p| p.srtt)
    }

    /// [`Neighbours::rtt_if_alive`] and how much that smoothed RTT itself wanders
    /// under the link's jitter: the samples' mean deviation scaled by the smoothing
    /// (an average of n samples varies about 1/√(2n−1) as much as one sample). The
    /// spread rises within a few heartbeats of jitter starting, long before a route's
    /// announced latencies can show it.
    pub fn rtt_and_spread_if_alive(&self, id: &str) -> Option<(Duration, Duration)> {
        self.rtt_and_spread_if_alive_at(self.index_of(id)?)
    }

    /// Position of neighbour `id` in this table (of the first, should an id be given
    /// twice). The neighbours are fixed when the table is made, so a position stays
    /// valid for the table's life: a caller that looks a neighbour up after every input
    /// can keep it and use [`Neighbours::rtt_and_spread_if_alive_at`].
    pub fn index_of(&self, id: &str) -> Option<usize> {
        let key = IdKey::of(id);
        self.keys
            .iter()
            .zip(&self.peers)
            .position(|(k, p)| k.matches(&p.addrs.id, key, id))
    }

    /// [`Neighbours::rtt_and_spread_if_alive`] of the neighbour at `index` (from
    /// [`Neighbours::index_of`]); `None` past the table's end too.
    pub fn rtt_and_spread_if_alive_at(&self, index: usize) -> Option<(Duration, Duration)> {
        let r = self.rtts.get(index).copied().flatten();
        debug_assert_eq!(r, self.rtt_of(index), "Neighbours::rtts out of step");
        r
    }

    /// Prefetch what a heartbeat or an ack reads ([`crate::hint::prefetch`]): the
    /// table's keys, deadlines, RTTs and sent heartbeats, its first neighbours'
    /// entries, and our own id (an ack carries a copy). For a caller that knows this
    /// table is next.
    #[inline]
    pub fn prefetch(&self) {
        use crate::hint::{prefetch, prefetch_all};
        prefetch(self.own_id.as_bytes());
        prefetch(self.keys.as_slice());
        prefetch(self.dead_at.as_slice());
        prefetch(self.rtts.as_slice());
        prefetch(self.sent.as_slices().0);
        crate::hint::prefetch_front(&self.transmits);
        for p in self.peers.iter().take(PREFETCHED_PEERS) {
            prefetch_all(p);
        }
    }

    /// How many samples the smoothed RTT averages over, at this heartbeat interval.
    fn smoothing_samples(&self) -> u32 {
        (RTT_SMOOTHING.as_micros() / self.config.heartbeat_interval.as_micros().max(1)).clamp(1, 64)
            as u32
    }

    /// Smoothed RTT to `id` (RFC 6298 SRTT, alpha 1/n with n samples over 800 ms; the
    /// first sample is taken as is).
    pub fn rtt(&self, id: &str) -> Option<Duration> {
        self.find(id).and_then(|p| p.srtt)
    }

    /// A snapshot of every neighbour, in the order given to [`Neighbours::new`].
    pub fn iter(&self) -> impl Iterator<Item = NeighbourInfo> + '_ {
        self.peers.iter().map(|p| NeighbourInfo {
            id: p.addrs.id.clone(),
            addr: p.addrs.preferred,
            alive: p.alive,
            rtt: p.srtt,
            incarnation: p.incarnation,
            heartbeats_sent: p.hb_sent,
            heartbeats_acked: p.hb_acked,
            window: p.window.counted_and_lost(),
        })
    }

    /// Number of liveness messages ignored because they came from an address that is
    /// no neighbour's, or named another node than the one owning the address.
    pub fn unknown_sender_count(&self) -> u64 {
        self.unknown
    }

    /// Number of liveness messages ignored because they carried another incarnation
    /// than the neighbour's current one while it was not silent for `dead_after` (with
    /// a key: an older one).
    pub fn refused_incarnation_count(&self) -> u64 {
        self.refused_incarnations
    }

    /// Number of times [`Neighbours::handle_timeout`] was called more than a heartbeat
    /// interval late (this node was not run), putting off neighbours' deaths by an
    /// interval.
    pub fn stall_count(&self) -> u64 {
        self.stalls
    }

    /// Consume a [`Message::Heartbeat`], [`Message::HeartbeatAck`] or [`Message::Bye`]
    /// (returns `true`); any other message is left alone (returns `false`).
    ///
    /// A liveness message from an address that is no neighbour's, or naming another
    /// node than the neighbour owning `from`, is ignored and counted
    /// ([`Neighbours::unknown_sender_count`]); so is a `Bye`. A heartbeat from a
    /// neighbour is answered with an ack, to `from`. Any accepted heartbeat or ack marks
    /// its sender alive ([`NeighbourEvent::Up`] if it was not); a new incarnation (see
    /// the module docs for when it is accepted) gives [`NeighbourEvent::Restarted`]; and
    /// an ack whose echoed timestamp matches one of our recent heartbeats gives an RTT
    /// sample.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, msg: &Message) -> bool {
        match msg {
            Message::Heartbeat {
                from: id,
                seq,
                sent_us,
                incarnation,
            } => {
                if self.heard(now, from, id, *incarnation).is_some() {
                    self.transmits.push_back(ControlTransmit {
                        to: from,
                        msg: Message::HeartbeatAck {
                            from: self.own_id.clone(),
                            seq: *seq,
                            echo_us: *sent_us,
                            incarnation: self.incarnation,
                        },
                    });
                }
                true
            }
            Message::HeartbeatAck {
                from: id,
                seq,
                echo_us,
                incarnation,
            } => {
                if let Some(i) = self.heard(now, from, id, *incarnation) {
                    if let Some(p) = self.peers.get_mut(i) {
                        if p.window.ack(self.hb_seq, *seq) {
                            p.hb_acked += 1;
                        }
                    }
                    let now_us = self.micros(now);
                    let genuine = self.sent.iter().any(|&(s, t)| s == *seq && t == *echo_us);
                    if genuine && *echo_us <= now_us {
                        let sample = Duration::from_micros(now_us - *echo_us);
                        // Smoothed over about RTT_SMOOTHING of samples whatever the
                        // heartbeat rate, so the tree and the clients see the same
                        // steadiness at any --heartbeat-ms.
                        let n = self.smoothing_samples();
                        if let Some(p) = self.peers.get_mut(i) {
                            if let Some(s) = p.srtt {
                                let dev = sample.abs_diff(s);
                                p.rttvar = (p.rttvar * 3 + dev) / 4;
                                p.spread = p.rttvar.div_f64(f64::from(2 * n - 1).sqrt());
                            }
                            p.srtt = Some(match p.srtt {
                                None => sample,
                                Some(s) => (s * (n - 1) + sample) / n,
                            });
                        }
                        self.sync_peer(i);
                    }
                }
                true
            }
            Message::Bye { from: id } => {
                match self.sender(from, id) {
                    Some(i) => {
                        let p = &mut self.peers[i];
                        p.last_heard = None;
                        if p.alive {
                            p.alive = false;
                            tracing::debug!(peer = %id, "neighbour said bye");
                            self.events.push_back(NeighbourEvent::Down(id.clone()));
                        }
                        self.sync_peer(i);
                    }
                    None => {
                        self.unknown += 1;
                        tracing::debug!(%from, "bye from an address that is not the neighbour's");
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// Position of the neighbour that sent a message claiming to be `id` from `addr`:
    /// `addr` must be one of its addresses.
    fn sender(&self, addr: SocketAddr, id: &str) -> Option<usize> {
        let key = IdKey::of(id);
        self.keys
            .iter()
            .zip(&self.peers)
            .position(|(k, p)| k.matches(&p.addrs.id, key, id) && p.addrs.owns(addr))
    }

    /// Record that neighbour `id` was heard from `addr` with `incarnation`; its
    /// position, or `None` (and a counter) when `addr` is not one of its addresses or
    /// the incarnation is refused.
    fn heard(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        id: &str,
        incarnation: u64,
    ) -> Option<usize> {
        let Some(i) = self.sender(addr, id) else {
            self.unknown += 1;
            tracing::debug!(%addr, "liveness message from an address that is not the named neighbour's");
            return None;
        };
        let dead_after = self.config.dead_after;
        let keyed = self.config.keyed;
        let p = &mut self.peers[i];
        if let Some(old) = p.incarnation.filter(|&old| old != incarnation) {
            // Without a key anyone can claim an incarnation: it may only move once the
            // current one has been silent for `dead_after`. With a key (every message
            // authenticated) it may also move forward at once.
            let silent = p
                .last_heard
                .is_none_or(|t| now.saturating_duration_since(t) >= dead_after);
            let accept = silent || (keyed && incarnation > old);
            if !accept {
                self.refused_incarnations += 1;
                tracing::debug!(peer = %id, old, new = incarnation, "incarnation refused");
                return None;
            }
            tracing::info!(peer = %id, old, new = incarnation, "neighbour restarted");
            p.srtt = None;
            p.rttvar = Duration::ZERO;
            p.spread = Duration::ZERO;
            self.events
                .push_back(NeighbourEvent::Restarted(p.addrs.id.clone()));
        }
        p.incarnation = Some(incarnation);
        if let (true, Some(t)) = (p.alive, p.last_heard) {
            let gap = now.saturating_duration_since(t);
            let longest = p
                .survived
                .filter(|(_, at)| now.saturating_duration_since(*at) < GAP_MEMORY)
                .map_or(Duration::ZERO, |(g, _)| g);
            if gap >= longest {
                p.survived = Some((gap, now));
            }
        }
        p.last_heard = Some(now);
        if !p.alive {
            p.alive = true;
            tracing::debug!(peer = %id, "neighbour up");
            self.events
                .push_back(NeighbourEvent::Up(p.addrs.id.clone()));
        }
        self.sync_peer(i);
        Some(i)
    }

    fn send_heartbeats(&mut self, now: Instant) {
        self.hb_seq += 1;
        let sent_us = self.micros(now);
        self.sent.push_back((self.hb_seq, sent_us));
        if self.sent.len() > SENT_HISTORY {
            self.sent.pop_front();
        }
        for p in &mut self.peers {
            p.hb_sent += 1;
            p.window.push();
            self.transmits.push_back(ControlTransmit {
                to: p.addrs.preferred,
                msg: Message::Heartbeat {
                    from: self.own_id.clone(),
                    seq: self.hb_seq,
                    sent_us,
                    incarnation: self.incarnation,
                },
            });
        }
        self.next_heartbeat = now + self.config.heartbeat_interval;
    }

    /// Send the heartbeats that are due and declare dead the neighbours silent for
    /// `dead_after`. Call it when [`Neighbours::poll_timeout`] is reached (calling it
    /// earlier or more often is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.shut {
            return;
        }
        // Called more than a heartbeat interval after a heartbeat was due: this node
        // was not run (a stalled host, a loaded machine), and what its neighbours sent
        // meanwhile may still wait in its sockets. Their silence proves nothing until
        // it had one interval to read them.
        let late = now.saturating_duration_since(self.next_heartbeat);
        if late > self.config.heartbeat_interval {
            self.stalls += 1;
            self.grace_until = Some(now + self.config.heartbeat_interval);
            tracing::debug!(
                late_ms = late.as_millis() as u64,
                "this node was not run: neighbours' deaths put off"
            );
        }
        if now >= self.next_heartbeat {
            self.send_heartbeats(now);
        }
        if self.grace_until.is_some_and(|g| now < g) {
            return;
        }
        let config = self.config;
        for k in 0..self.peers.len() {
            let p = &mut self.peers[k];
            if !p.alive {
                continue;
            }
            if let Some(t) = p.last_heard {
                if now.saturating_duration_since(t) >= p.dead_after(&config, now) {
                    p.alive = false;
                    tracing::debug!(peer = %p.addrs.id, "neighbour silent, declared dead");
                    self.events
                        .push_back(NeighbourEvent::Down(p.addrs.id.clone()));
                    self.sync_peer(k);
                }
            }
        }
    }

    /// When peer `i` is to be declared dead if not heard from again, as
    /// [`Neighbours::poll_timeout`] counts it (before any grace): `None` unless alive.
    fn dead_deadline(&self, i: usize) -> Option<Instant> {
        let p = self.peers.get(i).filter(|p| p.alive)?;
        let t = p.last_heard?;
        Some(t + p.dead_after(&self.config, t))
    }

    /// Peer `i`'s (smoothed RTT, spread) if alive and measured.
    fn rtt_of(&self, i: usize) -> Option<(Duration, Duration)> {
        let p = self.peers.get(i).filter(|p| p.alive)?;
        Some((p.srtt?, p.spread))
    }

    /// Set peer `i`'s copies in `dead_at` and `rtts` after a change of its liveness,
    /// last-heard time, survived silence or RTT.
    fn sync_peer(&mut self, i: usize) {
        let d = self.dead_deadline(i);
        if let Some(slot) = self.dead_at.get_mut(i) {
            *slot = d;
        }
        let r = self.rtt_of(i);
        if let Some(slot) = self.rtts.get_mut(i) {
            *slot = r;
        }
    }

    /// Queue a [`Message::Bye`] to every neighbour and stop sending heartbeats.
    pub fn shutdown(&mut self) {
        self.shut = true;
        for p in &self.peers {
            self.transmits.push_back(ControlTransmit {
                to: p.addrs.preferred,
                msg: Message::Bye {
                    from: self.own_id.clone(),
                },
            });
        }
    }

    /// The next message to send. Changed by every `handle*`, `shutdown` and `new`.
    pub fn poll_transmit(&mut self) -> Option<ControlTransmit> {
        crate::hint::pop_front_reset(&mut self.transmits)
    }

    /// The next neighbour event. Changed by `handle` and `handle_timeout`.
    pub fn poll_event(&mut self) -> Option<NeighbourEvent> {
        crate::hint::pop_front_reset(&mut self.events)
    }

    /// When [`Neighbours::handle_timeout`] must next be called: the next heartbeat or the
    /// earliest moment an alive neighbour becomes overdue. `None` after `shutdown`.
    /// Changed by every `handle*`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.shut {
            return None;
        }
        debug_assert!(
            (0..self.peers.len()).all(|i| self.dead_at[i] == self.dead_deadline(i)),
            "Neighbours::dead_at out of step with the peers"
        );
        let dead = self
            .dead_at
            .iter()
            .flatten()
            .map(|&d| self.grace_until.map_or(d, |g| d.max(g)))
            .min();
        Some(dead.map_or(self.next_heartbeat, |d| d.min(self.next_heartbeat)))
    }
}

#[cfg(test)]
// Tests take the real clock as an arbitrary origin of fake time, and read sample files.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    /// The bit window answers as a list of (seq, acknowledged) of the last
    /// [`LOSS_WINDOW`] heartbeats would: acks counted once, stale and future seqs
    /// ignored, the loss counted over all but the newest [`IN_FLIGHT`].
    #[test]
    fn the_loss_window_matches_a_list_of_the_last_heartbeats() {
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let (mut w, mut list) = (LossWindow::default(), VecDeque::<(u64, bool)>::new());
        let mut newest = 0u64;
        for _ in 0..20_000 {
            if next(3) == 0 {
                newest += 1;
                w.push();
                if list.len() == LOSS_WINDOW {
                    list.pop_front();
                }
                list.push_back((newest, false));
            } else {
                let seq = (newest + 3).saturating_sub(next(LOSS_WINDOW as u64 + 10));
                let want = match list.iter_mut().find(|(s, a)| *s == seq && !*a) {
                    Some(e) => {
                        e.1 = true;
                        true
                    }
                    None => false,
                };
                assert_eq!(w.ack(newest, seq), want, "ack of {seq} at {newest}");
            }
            let counted = list.len().saturating_sub(IN_FLIGHT);
            let lost = list.iter().take(counted).filter(|(_, a)| !a).count();
            assert_eq!(w.counted_and_lost(), (counted as u32, lost as u32));
        }
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 7000))
    }

    fn setup() -> (Neighbours, Instant) {
        let t0 = Instant::now();
        let n = Neighbours::new(
            "a".into(),
            1,
            t0,
            LivenessConfig::default(),
            vec![("b".into(), addr(2)), ("c".into(), addr(3))],
            t0,
        );
        (n, t0)
    }

    #[test]
    fn id_keys_match_exactly_the_same_id() {
        let ids = [
            "",
            "a",
            "a\0",
            "ab",
            "ba",
            "r00650",
            "r00651",
            "fifteen-bytes-x",
            "sixteen-bytes-xy",
            "sixteen-bytes-yx",
            "a much longer node id than fits",
            "a much longer node id than fitz",
        ];
        for a in ids {
            for b in ids {
                let (ka, kb) = (IdKey::of(a), IdKey::of(b));
                assert_eq!(ka.matches(a, kb, b), a == b, "{a:?} {b:?}");
                if a.len() <= INLINE_ID || b.len() <= INLINE_ID {
                    assert_eq!(ka == kb, a == b, "{a:?} {b:?}");
                }
            }
        }
        // A long id whose key collided with another's is still told apart by its bytes.
        let k = IdKey::of("a much longer node id than fits");
        assert!(!k.matches("a much longer node id than fits", k, "another id"));
    }

    fn drain(n: &mut Neighbours) -> (Vec<ControlTransmit>, Vec<NeighbourEvent>) {
        let t = std::iter::from_fn(|| n.poll_transmit()).collect();
        let e = std::iter::from_fn(|| n.poll_event()).collect();
        (t, e)
    }

    fn hb(from: &str, seq: u64, sent_us: u64, inc: u64) -> Message {
        Message::Heartbeat {
            from: from.into(),
            seq,
            sent_us,
            incarnation: inc,
        }
    }

    #[test]
    fn a_neighbour_found_by_position_is_the_one_found_by_id() {
        let (mut n, t0) = setup();
        drain(&mut n);
        assert_eq!(
            (n.index_of("b"), n.index_of("c"), n.index_of("x")),
            (Some(0), Some(1), None)
        );
        let ack = Message::HeartbeatAck {
            from: "b".into(),
            seq: 1,
            echo_us: 0,
            incarnation: 1,
        };
        assert!(n.handle(t0 + Duration::from_millis(10), addr(2), &ack));
        let by_id = n.rtt_and_spread_if_alive("b");
        assert!(by_id.is_some_and(|(rtt, _)| rtt == Duration::from_millis(10)));
        assert_eq!(n.rtt_and_spread_if_alive_at(0), by_id);
        assert_eq!(n.rtt_and_spread_if_alive_at(1), None, "c is not alive");
        assert_eq!(n.rtt_and_spread_if_alive_at(2), None, "past the end");
    }

    #[test]
    fn test_initial_heartbeats_and_not_alive() {
        let (mut n, t0) = setup();
        let (tx, ev) = drain(&mut n);
        assert_eq!(tx.len(), 2);
        assert!(ev.is_empty());
        assert!(matches!(tx[0].msg, Message::Heartbeat { seq: 1, .. }));
        assert!(!n.is_alive("b"));
        assert_eq!(
            n.poll_timeout(),
            Some(t0 + LivenessConfig::default().heartbeat_interval)
        );
    }

    #[test]
    fn test_heartbeat_answered_and_up() {
        let (mut n, t0) = setup();
        drain(&mut n);
        assert!(n.handle(t0, addr(2), &hb("b", 5, 42, 1)));
        let (tx, ev) = drain(&mut n);
        assert_eq!(ev, vec![NeighbourEvent::Up("b".into())]);
        assert_eq!(
            tx,
            vec![ControlTransmit {
                to: addr(2),
                msg: Message::HeartbeatAck {
                    from: "a".into(),
                    seq: 5,
                    echo_us: 42,
                    incarnation: 1
                }
            }]
        );
        assert!(n.is_alive("b"));
        assert!(!n.handle(t0, addr(2), &Message::ListStreams));
    }

    #[test]
    fn test_loss_ratio_over_the_last_heartbeats() {
        let (mut n, t0) = setup();
        drain(&mut n);
        let every = LivenessConfig::default().heartbeat_interval;
        let info = |n: &Neighbours, id: &str| n.iter().find(|i| i.id == id).unwrap();
        assert_eq!(info(&n, "b").loss_ratio(), None, "nothing counts yet");
        // 100 heartbeats; b acks every other one (twice each: counted once), c none.
        for k in 0..100u64 {
            let now = t0 + every * (k as u32 + 1);
            n.handle_timeout(now);
            let seq = k + 1; // the heartbeat of the previous round
            if seq % 2 == 0 {
                for _ in 0..2 {
                    let ack = Message::HeartbeatAck {
                        from: "b".into(),
                        seq,
                        echo_us: 0,
                        incarnation: 1,
                    };
                    n.handle(now, addr(2), &ack);
                }
            }
            drain(&mut n);
        }
        let b = info(&n, "b");
        assert_eq!(b.heartbeats_sent, 101);
        assert_eq!(b.heartbeats_acked, 50);
        assert_eq!(b.window.0, (LOSS_WINDOW - IN_FLIGHT) as u32);
        let loss = b.loss_ratio().unwrap();
        assert!((loss - 0.5).abs() < 0.03, "{loss}");
        let c = info(&n, "c");
        assert_eq!(c.loss_ratio(), Some(1.0));
        assert_eq!(c.heartbeats_acked, 0);
        // b answers everything from now on: the window forgets the old losses.
        for k in 100..160u64 {
            let now = t0 + every * (k as u32 + 1);
            n.handle_timeout(now);
            let ack = Message::HeartbeatAck {
                from: "b".into(),
                seq: k + 1,
                echo_us: 0,
                incarnation: 1,
            };
            n.handle(now, addr(2), &ack);
            drain(&mut n);
        }
        assert_eq!(info(&n, "b").loss_ratio(), Some(0.0));
    }

    #[test]
    fn test_rtt_from_echo_smoothed() {
        let (mut n, t0) = setup();
        drain(&mut n);
        let ack = |echo_us, seq| Message::HeartbeatAck {
            from: "b".into(),
            seq,
            echo_us,
            incarnation: 1,
        };
        n.handle(t0 + Duration::from_millis(10), addr(2), &ack(0, 1));
        assert_eq!(n.rtt("b"), Some(Duration::from_millis(10)));
        n.handle_timeout(t0 + Duration::from_millis(250));
        n.handle(t0 + Duration::from_millis(276), addr(2), &ack(250_000, 2));
        // 50 ms heartbeats: smoothed over 16 samples, 15/16 * 10 + 1/16 * 26 = 11 ms
        assert_eq!(n.config.heartbeat_interval, Duration::from_millis(50));
        assert_eq!(n.rtt("b"), Some(Duration::from_millis(11)));
        // A forged echo that matches no heartbeat of ours gives no sample.
        n.handle(t0 + Duration::from_millis(300), addr(2), &ack(1, 2));
        assert_eq!(n.rtt("b"), Some(Duration::from_millis(11)));
    }

    #[test]
    fn test_dead_after_silence() {
        let (mut n, t0) = setup();
        n.handle(t0, addr(2), &hb("b", 1, 0, 1));
        drain(&mut n);
        let mut t = t0;
        let mut down_at = None;
        while t < t0 + Duration::from_secs(3) {
            t = n.poll_timeout().expect("running");
            n.handle_timeout(t);
            let (_, ev) = drain(&mut n);
            if ev.contains(&NeighbourEvent::Down("b".into())) {
                down_at = Some(t);
                break;
            }
        }
        assert_eq!(down_at, Some(t0 + LivenessConfig::default().dead_after));
        assert!(!n.is_alive("b"));
        // Heard again: up again.
        n.handle(t, addr(2), &hb("b", 9, 0, 1));
        assert_eq!(drain(&mut n).1, vec![NeighbourEvent::Up("b".into())]);
    }

    #[test]
    fn test_a_node_that_was_not_run_reads_before_it_declares_deaths() {
        let (mut n, t0) = setup();
        n.handle(t0, addr(2), &hb("b", 1, 0, 1));
        drain(&mut n);
        let config = LivenessConfig::default();
        // Not run for a whole second: the neighbour's heartbeats wait in the socket.
        let late = t0 + Duration::from_secs(1);
        n.handle_timeout(late);
        assert!(n.is_alive("b"), "not dead on waking up late");
        assert_eq!(n.stall_count(), 1);
        assert!(n
            .poll_timeout()
            .is_some_and(|w| w >= late + config.heartbeat_interval));
        // What it sent meanwhile is read: alive, and dead only after a real silence.
        n.handle(late, addr(2), &hb("b", 2, 0, 1));
        let mut t = late;
        let mut down_at = None;
        while t < late + Duration::from_secs(2) {
            t = n.poll_timeout().expect("running");
            n.handle_timeout(t);
            if drain(&mut n).1.contains(&NeighbourEvent::Down("b".into())) {
                down_at = Some(t);
                break;
            }
        }
        // It came back from a second's silence (as this node saw it): for a while it
        // is given four times the usual time.
        assert_eq!(down_at, Some(late + config.dead_after * 4));
        assert_eq!(n.stall_count(), 1, "on time since");
        // Silent while the node kept running: dead as before, even after one late tick.
        assert!(!n.is_alive("b"));
    }

    #[test]
    fn test_a_neighbour_that_came_back_from_a_silence_gets_twice_that_for_a_while() {
        let (mut n, t0) = setup();
        let config = LivenessConfig::default();
        let mut seq = 0;
        let mut hb_at = |n: &mut Neighbours, t: Instant| {
            seq += 1;
            n.handle(t, addr(2), &hb("b", seq, 0, 1));
            drain(n);
        };
        // Heard every interval, then once after 150 ms of silence.
        hb_at(&mut n, t0);
        let mut t = t0;
        let tick = |n: &mut Neighbours, until: Instant| -> Option<Instant> {
            while let Some(w) = n.poll_timeout().filter(|w| *w <= until) {
                n.handle_timeout(w);
                if drain(n).1.contains(&NeighbourEvent::Down("b".into())) {
                    return Some(w);
                }
            }
            None
        };
        let silence = Duration::from_millis(150);
        assert!(silence < config.dead_after);
        assert_eq!(tick(&mut n, t + silence), None);
        t += silence;
        hb_at(&mut n, t);
        // Now silent: dead after 300 ms, not 200.
        let down = tick(&mut n, t + Duration::from_secs(1));
        assert_eq!(down, Some(t + silence * 2));
        // Back, steady for longer than the memory: then the usual 200 ms again.
        let mut t = t + Duration::from_secs(1);
        hb_at(&mut n, t);
        let end = t + GAP_MEMORY + Duration::from_secs(1);
        while t < end {
            assert_eq!(tick(&mut n, t), None);
            t += config.heartbeat_interval;
            hb_at(&mut n, t);
        }
        assert_eq!(
            tick(&mut n, t + Duration::from_secs(1)),
            Some(t + config.dead_after)
        );
    }

    /// A neighbour `b` with two addresses, the table at time `t0`.
    fn multihomed() -> (Neighbours, Instant) {
        let t0 = Instant::now();
        let b = PeerAddrs::new("b", addr(2), vec![addr(2), addr(12)]);
        let c = PeerAddrs::from(("c".to_owned(), addr(3)));
        let config = LivenessConfig::default();
        let n = Neighbours::with_peers("a".into(), 1, t0, config, vec![b, c], t0);
        (n, t0)
    }

    #[test]
    fn test_restart_recognised_after_silence_only() {
        let (mut n, t0) = setup();
        n.handle(t0, addr(2), &hb("b", 1, 0, 1));
        drain(&mut n);
        // Another incarnation while b is heard from: refused (anyone can claim one).
        let t1 = t0 + Duration::from_millis(100);
        n.handle(t1, addr(2), &hb("b", 1, 0, 2));
        let (tx, ev) = drain(&mut n);
        assert!(tx.is_empty() && ev.is_empty(), "{tx:?} {ev:?}");
        assert_eq!(n.refused_incarnation_count(), 1);
        // b's old incarnation is silent from t0 on; once silent for dead_after, the new
        // one is b again.
        let dead_after = LivenessConfig::default().dead_after;
        n.handle(
            t0 + dead_after - Duration::from_millis(1),
            addr(2),
            &hb("b", 2, 0, 2),
        );
        assert!(drain(&mut n).1.is_empty());
        assert_eq!(n.refused_incarnation_count(), 2);
        n.handle(t0 + dead_after, addr(2), &hb("b", 3, 0, 2));
        let (tx, ev) = drain(&mut n);
        assert_eq!(ev, vec![NeighbourEvent::Restarted("b".into())]);
        assert_eq!(tx.len(), 1, "the heartbeat is answered");
        assert!(n.is_alive("b"));
        // The old incarnation is now the stranger.
        n.handle(t0 + dead_after, addr(2), &hb("b", 4, 0, 1));
        assert!(drain(&mut n).1.is_empty());
        assert_eq!(n.iter().next().and_then(|i| i.incarnation), Some(2));
    }

    #[test]
    fn test_restart_after_declared_dead() {
        let (mut n, t0) = setup();
        n.handle(t0, addr(2), &hb("b", 1, 0, 1));
        drain(&mut n);
        let t = t0 + Duration::from_secs(1);
        // Run on time until then (a late tick would put the death off).
        let mut events = Vec::new();
        while let Some(w) = n.poll_timeout().filter(|w| *w <= t) {
            n.handle_timeout(w);
            events.extend(drain(&mut n).1);
        }
        assert!(events.contains(&NeighbourEvent::Down("b".into())));
        // Back with a lower incarnation (its clock went back): recognised too.
        n.handle(t, addr(2), &hb("b", 1, 0, 0));
        let ev = drain(&mut n).1;
        assert!(
            ev.contains(&NeighbourEvent::Restarted("b".into())),
            "{ev:?}"
        );
        assert!(ev.contains(&NeighbourEvent::Up("b".into())), "{ev:?}");
    }

    #[test]
    fn test_keyed_restart_is_at_once_and_never_backwards() {
        let t0 = Instant::now();
        let config = LivenessConfig {
            keyed: true,
            ..LivenessConfig::default()
        };
        let peers = vec![("b".to_owned(), addr(2))];
        let mut n = Neighbours::new("a".into(), 1, t0, config, peers, t0);
        n.handle(t0, addr(2), &hb("b", 1, 0, 1));
        drain(&mut n);
        n.handle(t0, addr(2), &hb("b", 1, 0, 2));
        assert_eq!(drain(&mut n).1, vec![NeighbourEvent::Restarted("b".into())]);
        n.handle(t0, addr(2), &hb("b", 2, 0, 1));
        let (tx, ev) = drain(&mut n);
        assert!(tx.is_empty() && ev.is_empty());
        assert_eq!(n.refused_incarnation_count(), 1);
    }

    #[test]
    fn test_forged_max_incarnation_does_not_cut_a_neighbour_off() {
        let (mut n, t0) = setup();
        n.handle(t0, addr(2), &hb("b", 1, 0, 7));
        drain(&mut n);
        let forged = hb("b", 1, 0, u64::MAX);
        let forger = SocketAddr::from(([192, 0, 2, 66], 7000));
        let mut t = t0;
        let mut changes = 0;
        // For 5 s, b heartbeats every 100 ms while a forger sends incarnation 2^64 - 1
        // claiming to be b, from a stranger's address and from b's own address.
        for i in 0..50u64 {
            t += Duration::from_millis(100);
            n.handle(t, forger, &forged);
            n.handle(t, addr(2), &forged);
            n.handle(t, addr(2), &hb("b", i + 2, 0, 7));
            n.handle_timeout(t);
            let (tx, ev) = drain(&mut n);
            changes += ev
                .iter()
                .filter(|e| matches!(e, NeighbourEvent::Down(_) | NeighbourEvent::Restarted(_)))
                .count();
            // Nothing ever goes to the forger's address.
            assert!(tx.iter().all(|x| x.to != forger));
        }
        assert_eq!(changes, 0);
        assert!(n.is_alive("b"));
        assert_eq!(n.iter().next().and_then(|i| i.incarnation), Some(7));
        assert_eq!(n.unknown_sender_count(), 50);
    }

    #[test]
    fn test_bye_is_down_at_once() {
        let (mut n, t0) = setup();
        n.handle(t0, addr(3), &hb("c", 1, 0, 1));
        drain(&mut n);
        assert!(n.handle(t0, addr(3), &Message::Bye { from: "c".into() }));
        assert_eq!(drain(&mut n).1, vec![NeighbourEvent::Down("c".into())]);
        assert!(!n.is_alive("c"));
    }

    #[test]
    fn test_forged_bye_from_elsewhere_counts_for_nothing() {
        let (mut n, t0) = setup();
        n.handle(t0, addr(3), &hb("c", 1, 0, 1));
        drain(&mut n);
        // From a stranger, and from b's address claiming to be c.
        n.handle(t0, addr(9), &Message::Bye { from: "c".into() });
        n.handle(t0, addr(2), &Message::Bye { from: "c".into() });
        assert!(drain(&mut n).1.is_empty());
        assert!(n.is_alive("c"));
        assert_eq!(n.unknown_sender_count(), 2);
    }

    #[test]
    fn test_only_given_addresses_no_aliases() {
        let (mut n, t0) = setup();
        drain(&mut n);
        // A stranger naming a stranger, and a stranger naming neighbour b.
        n.handle(t0, addr(9), &hb("zz", 1, 0, 1));
        let other = SocketAddr::from(([192, 168, 1, 2], 7000));
        n.handle(t0, other, &hb("b", 1, 0, 1));
        // c's address naming b.
        n.handle(t0, addr(3), &hb("b", 1, 0, 1));
        assert_eq!(n.unknown_sender_count(), 3);
        let (tx, ev) = drain(&mut n);
        assert!(
            tx.is_empty(),
            "heartbeats are answered only to neighbours: {tx:?}"
        );
        assert!(ev.is_empty());
        assert!(!n.is_alive("b"));
        assert_eq!(n.id_of(other), None);
        assert_eq!(n.id_of(addr(2)), Some("b"));
        assert_eq!(n.addr_of("c"), Some(addr(3)));
        assert_eq!(n.id_of(addr(9)), None);
    }

    #[test]
    fn test_every_given_address_is_the_neighbour() {
        let (mut n, t0) = multihomed();
        drain(&mut n);
        assert_eq!(n.id_of(addr(12)), Some("b"));
        assert_eq!(n.addr_of("b"), Some(addr(2)));
        // b speaks from its second address: it is b, and the ack goes back there.
        n.handle(t0, addr(12), &hb("b", 1, 0, 1));
        let (tx, ev) = drain(&mut n);
        assert_eq!(ev, vec![NeighbourEvent::Up("b".into())]);
        assert_eq!(tx.len(), 1);
        assert_eq!(tx[0].to, addr(12));
        // Heartbeats still go to the preferred address.
        n.handle_timeout(t0 + Duration::from_millis(100));
        let (tx, _) = drain(&mut n);
        assert!(tx.iter().any(|t| t.to == addr(2)));
        assert!(tx.iter().all(|t| t.to != addr(12)));
    }

    #[test]
    fn test_config_is_clamped() {
        let c = LivenessConfig::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(c.heartbeat_interval, Duration::from_millis(1));
        assert_eq!(c.dead_after, Duration::from_millis(1));
        let c = LivenessConfig::new(Duration::from_millis(200), Duration::from_millis(50));
        assert_eq!(c.dead_after, Duration::from_millis(200));
    }

    #[test]
    fn test_shutdown_sends_bye() {
        let (mut n, _) = setup();
        drain(&mut n);
        n.shutdown();
        let (tx, _) = drain(&mut n);
        assert_eq!(tx.len(), 2);
        assert!(tx.iter().all(|t| matches!(t.msg, Message::Bye { .. })));
        assert_eq!(n.poll_timeout(), None);
    }
}
