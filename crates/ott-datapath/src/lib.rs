//! The overlay's data plane for one node, as one sans-IO state machine.
//!
//! A relay's forwarder, a server's media thread and a viewer all run the same per-stream
//! logic over their sockets; [`DataPath`] is that logic, written once:
//!
//! - **Forwarding table.** A stream has state only while it has a route
//!   ([`DataPath::set_route`]); removing the route frees every piece of it. At most
//!   [`Config::max_streams`] streams and [`Config::max_children`] children per stream.
//! - **Tag check before decode.** With an overlay key, a media datagram's tag is checked
//!   before its header is read; a failure is counted ([`Drop::Auth`]) and dropped.
//! - **Duplicate suppression and source lock** ([`dedup::StreamDedup`]): one source per
//!   stream at a time, another adopted only after the current one fell silent.
//! - **Upstream binding and gap tracking.** The address live (not resent) data comes
//!   from is the upstream; before any live data, the sender of the first datagram is.
//!   Gaps are NACKed to it ([`Payload::Nack`]).
//! - **Retransmission buffer.** NACKs are answered only for current children, at most
//!   [`Config::max_resend_per_nack`] datagrams each, within a per-child byte budget.
//! - **Start cache** ([`start_cache::StartCache`]): each new child first gets the stream
//!   from its last keyframe, then the stream's recent past that the cache lacks (what
//!   came within the NACK budget, from the retransmission buffer): a node or viewer
//!   that moved here after losing its parent or PoP gets what it missed at once.
//! - **Per-child delivery.** An overlay member gets the bytes as received; a viewer
//!   without a session gets them without the overlay tag; a viewer with a session gets
//!   them sealed with its [`SessionKey`].
//! - **Counters** ([`DataPathCounters`], [`StreamStats`]) for every datagram and every drop.
//!
//! # Driving it
//!
//! Nothing here opens a socket, spawns a thread or reads the clock. The caller feeds
//! received media with [`DataPath::handle_media`] (tagging each with a `token`, e.g. its
//! slot in a receive batch; or a whole receive batch with
//! [`DataPath::handle_media_batch`], which checks and seals its tags together), NACKs it decoded with [`DataPath::handle_nack`], routes with
//! [`DataPath::set_route`], and calls [`DataPath::handle_timeout`] when
//! [`DataPath::poll_timeout`] is reached. After each call it drains
//! [`DataPath::poll_transmit`] (sending each [`Transmit`]; [`Payload::Input`] refers to
//! a datagram it passed in, so live forwarding copies nothing per child) and
//! [`DataPath::poll_event`]. The transmit queue refers to input tokens, so drain it
//! before reusing the buffers the tokens name.
//!
//! The wire format is `ott-proto`'s; this crate adds none.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod dedup;
pub mod start_cache;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use ott_media::arq::{nacked_seqs, GapTracker, NackConfig, RetransmitBuffer};
use ott_proto::auth::{media_digests_many, OverlayKey, SessionKey, DIGEST_LEN, TAG_LEN};
use ott_proto::{flags, MediaHeader, NackRange, HEADER_LEN, MAGIC};

use dedup::{StreamDedup, Verdict};
use start_cache::StartCache;

/// Limits and options of a [`DataPath`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// NACK the upstream for missing datagrams. Answering children's NACKs is always on.
    pub nack: bool,
    /// Most streams with state; routes past it are refused ([`DataPathCounters::stream_cap`]).
    pub max_streams: usize,
    /// Most children of one stream; the rest of a route is cut ([`DataPathCounters::child_cap`]).
    pub max_children: usize,
    /// Most children of one stream at one IP address (above the tree's cap on viewers
    /// per IP, as a second line); the rest are cut ([`DataPathCounters::child_cap`]).
    pub max_children_per_ip: usize,
    /// Datagrams of each stream kept for retransmission.
    pub retransmit_depth: usize,
    /// Most datagrams resent for one NACK.
    pub max_resend_per_nack: usize,
    /// Retransmission budget of each child, bytes per second...
    pub resend_bytes_per_sec: u64,
    /// ...and the most it may save up (a burst).
    pub resend_burst_bytes: u64,
    /// When to NACK gaps, and when to give them up.
    pub nack_config: NackConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nack: true,
            max_streams: 256,
            max_children: 1024,
            max_children_per_ip: 64,
            retransmit_depth: 2048,
            max_resend_per_nack: 256,
            resend_bytes_per_sec: 4 << 20,
            resend_burst_bytes: 1 << 20,
            nack_config: NackConfig::default(),
        }
    }
}

impl Config {
    /// A viewer's data path: NACKs to where the stream comes from (if `nack`), missing
    /// datagrams given up after the playout `latency` budget, nothing kept for
    /// retransmission (a viewer forwards nothing). Use with [`DataPath::for_viewer`].
    pub fn viewer(nack: bool, latency: std::time::Duration) -> Self {
        Self {
            nack,
            retransmit_depth: 1,
            nack_config: NackConfig {
                give_up_after: latency,
                ..NackConfig::default()
            },
            ..Self::default()
        }
    }
}

/// The children of a route as the tree gives them (data addresses, and the session key
/// of each viewer among them) as [`DataPath::set_route`] takes them: a viewer with a
/// session gets the media sealed with its key, an overlay member (`is_member`) as
/// received, anyone else without the overlay tag.
pub fn children_from(
    children: &[SocketAddr],
    sessions: &[(SocketAddr, SessionKey)],
    is_member: impl Fn(SocketAddr) -> bool,
) -> Vec<Child> {
    children
        .iter()
        .map(|c| Child {
            addr: *c,
            kind: match sessions.iter().find(|(a, _)| a == c) {
                Some((_, k)) => ChildKind::Session(k.clone()),
                None if is_member(*c) => ChildKind::Member,
                None => ChildKind::Strip,
            },
        })
        .collect()
}

/// How a child gets a stream.
#[derive(Debug, Clone)]
pub enum ChildKind {
    /// As received (an overlay member, or anyone when there is no overlay key).
    Member,
    /// Without the overlay key's tag (a child that is not a member, without a session).
    Strip,
    /// A viewer: without the overlay tag, sealed with its session key.
    Session(SessionKey),
}

/// One child of a stream.
#[derive(Debug, Clone)]
pub struct Child {
    /// Its data address.
    pub addr: SocketAddr,
    /// How it gets the media.
    pub kind: ChildKind,
}

impl Child {
    /// A child that gets the bytes as received.
    pub fn member(addr: SocketAddr) -> Self {
        Self {
            addr,
            kind: ChildKind::Member,
        }
    }
}

/// What to send in one [`Transmit`].
#[derive(Debug, Clone)]
pub enum Payload {
    /// The first `len` bytes of the datagram passed in with `token`.
    Input {
        /// The caller's token of that datagram.
        token: usize,
        /// How many of its bytes.
        len: usize,
    },
    /// These bytes (a retransmission, a cached start, a copy sealed for a viewer).
    Bytes(Bytes),
    /// A NACK for the upstream: encode (and seal) a `Message::Nack` with these.
    Nack {
        /// The stream.
        stream: u32,
        /// The missing sequence numbers.
        ranges: Vec<NackRange>,
    },
}

/// One datagram to send.
#[derive(Debug, Clone)]
pub struct Transmit {
    /// Where to.
    pub to: SocketAddr,
    /// What.
    pub payload: Payload,
}

/// Something the caller may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataPathEvent {
    /// Live data of `stream` now comes from `from`, whose tag checked (when keyed): an
    /// overlay member's address.
    Upstream {
        /// The stream.
        stream: u32,
        /// The upstream's data address.
        from: SocketAddr,
    },
    /// Another source took over `stream`: its numbers are unrelated to the old one's
    /// (a viewer resets its reassembly).
    SourceSwitched {
        /// The stream.
        stream: u32,
    },
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Its overlay tag failed (checked before decoding).
    Auth,
    /// Not a media datagram.
    Malformed,
    /// Its stream has no route here.
    Unrouted,
    /// Already seen.
    Duplicate,
    /// Another source's while the current one flows.
    OtherSource,
}

/// Node-wide counters of a [`DataPath`]; each cap has one, counted when it bites.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataPathCounters {
    /// Media datagrams received.
    pub datagrams_in: u64,
    /// Their bytes.
    pub bytes_in: u64,
    /// Datagrams queued for sending (media to children, retransmissions, NACKs).
    pub datagrams_out: u64,
    /// Media datagrams whose overlay tag failed.
    pub auth_failed: u64,
    /// Media datagrams that did not parse.
    pub malformed: u64,
    /// Media datagrams of streams without a route.
    pub unrouted: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Another source's datagrams dropped (source lock).
    pub other_source: u64,
    /// Routes refused at [`Config::max_streams`].
    pub stream_cap: u64,
    /// Children cut at [`Config::max_children`] or [`Config::max_children_per_ip`].
    pub child_cap: u64,
    /// NACKs received.
    pub nacks_received: u64,
    /// NACKs ignored: unrouted stream, or not from a current child.
    pub nacks_refused: u64,
    /// NACKs that got at least one retransmission.
    pub nacks_answered: u64,
    /// NACKs sent upstream.
    pub nacks_sent: u64,
    /// Children's NACKs for datagrams from before this node had the stream, passed on
    /// upstream ([`ott_media::arq::GapTracker::want_older`]).
    pub nacks_relayed: u64,
    /// Datagrams resent.
    pub retransmitted: u64,
    /// Retransmissions refused by the per-NACK cap or a child's byte budget.
    pub resend_budget: u64,
    /// Datagrams replayed from start caches.
    pub replayed: u64,
    /// Datagrams of a stream's recent past sent to a new child
    /// ([`DataPath::set_route`]).
    pub caught_up: u64,
    /// Source switches.
    pub source_switches: u64,
}

/// Traffic of one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Media datagrams received (duplicates included).
    pub datagrams_in: u64,
    /// Their bytes.
    pub bytes_in: u64,
    /// Frames started (first fragments accepted).
    pub frames_in: u64,
    /// Media datagrams queued to children.
    pub datagrams_out: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Another source's datagrams dropped.
    pub other_source: u64,
    /// Current number of children.
    pub children: usize,
    /// NACKs sent upstream.
    pub nacks_sent: u64,
    /// NACKs received from children.
    pub nacks_received: u64,
    /// NACKs answered with at least one datagram.
    pub nacks_answered: u64,
    /// Children's NACKs for datagrams from before this node had the stream, passed on upstream.
    pub nacks_relayed: u64,
    /// Datagrams resent to children.
    pub retransmitted: u64,
    /// Missing datagrams given up.
    pub given_up: u64,
    /// When the last live datagram (neither resent nor cached) was accepted: the
    /// shell tells the tree when the upstream went silent.
    pub last_live_in: Option<Instant>,
}

/// A token bucket of bytes: what a child may get in retransmissions.
#[derive(Debug, Clone, Copy)]
struct Budget {
    tokens: u64,
    at: Instant,
}

impl Budget {
    fn new(now: Instant, burst: u64) -> Self {
        Self {
            tokens: burst,
            at: now,
        }
    }

    fn take(&mut self, now: Instant, n: u64, rate: u64, burst: u64) -> bool {
        let elapsed = now.saturating_duration_since(self.at);
        let refill = (elapsed.as_micros() as u64).saturating_mul(rate) / 1_000_000;
        if refill > 0 {
            self.tokens = self.tokens.saturating_add(refill).min(burst);
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

struct ChildState {
    child: Child,
    budget: Budget,
}

struct Stream {
    children: Vec<ChildState>,
    seen: StreamDedup,
    stats: StreamStats,
    buffer: RetransmitBuffer,
    gaps: GapTracker,
    cache: StartCache,
    upstream: Option<SocketAddr>,
    /// Kept without children (a server's own stream).
    pinned: bool,
}

impl Stream {
    fn new(depth: usize, nack: NackConfig) -> Self {
        Self {
            children: Vec::new(),
            seen: StreamDedup::default(),
            stats: StreamStats::default(),
            buffer: RetransmitBuffer::new(depth),
            gaps: GapTracker::new(nack),
            cache: StartCache::new(),
            upstream: None,
            pinned: false,
        }
    }
}

/// Most session keys a viewer's data path holds.
pub const MAX_SESSIONS: usize = 8;

/// A media datagram the data path accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Its header.
    pub header: MediaHeader,
    /// Its length without the tag checked on it (header and payload).
    pub len: usize,
}

/// One received media datagram of a batch, for [`DataPath::handle_media_batch`].
#[derive(Debug, Clone, Copy)]
pub struct MediaIn<'a> {
    /// Its sender, if known.
    pub from: Option<SocketAddr>,
    /// Its bytes.
    pub datagram: &'a [u8],
    /// Its token in the [`Payload::Input`]s queued for it.
    pub token: usize,
}

/// A viewer's copy of a datagram of the current batch whose seal is made at the end of
/// the batch, with those of the batch's other datagrams to the same viewer.
struct PendingSeal {
    /// Its place in the transmit queue.
    at: usize,
    /// The viewer's key.
    key: SessionKey,
    /// Which datagram of the batch, and its length without the overlay tag.
    input: usize,
    len: usize,
}

/// Whether `datagram` looks like media (else it is control: a NACK, or garbage).
pub fn is_media(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER_LEN && datagram[..2] == MAGIC
}

/// The data plane of one node; see the crate documentation.
pub struct DataPath {
    config: Config,
    key: Option<OverlayKey>,
    /// A viewer's: media must carry the tag of one of these session keys.
    sessions: Option<VecDeque<SessionKey>>,
    streams: HashMap<u32, Stream>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<DataPathEvent>,
    counters: DataPathCounters,
    /// During [`DataPath::handle_media_batch`]: the seals for viewers still to make, and
    /// the batch position of the datagram being handled.
    pending: Option<(Vec<PendingSeal>, usize)>,
    /// Reused buffers of [`DataPath::handle_media_batch`].
    scratch_ok: Vec<bool>,
    /// The media digest of each datagram of the batch when keyed, else of each one
    /// sealed for viewers.
    scratch_digests: Vec<[u8; DIGEST_LEN]>,
}

impl std::fmt::Debug for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPath")
            .field("streams", &self.streams.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl DataPath {
    /// A data path with `config`; with `key`, media must carry the overlay tag.
    pub fn new(config: Config, key: Option<OverlayKey>) -> Self {
        Self {
            config,
            key,
            sessions: None,
            streams: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            counters: DataPathCounters::default(),
            pending: None,
            scratch_ok: Vec::new(),
            scratch_digests: Vec::new(),
        }
    }

    /// A viewer's data path: media is accepted only with the tag of a session key given
    /// to [`DataPath::add_session`] (none at first: nothing is accepted before
    /// admission). Nothing is forwarded, so keep `config.retransmit_depth` small.
    pub fn for_viewer(config: Config) -> Self {
        let mut dp = Self::new(config, None);
        dp.sessions = Some(VecDeque::new());
        dp
    }

    /// A viewer's new session key (one per PoP that admitted it; the oldest beyond
    /// [`MAX_SESSIONS`] is forgotten). Ignored by a data path that is not a viewer's.
    pub fn add_session(&mut self, key: SessionKey) {
        if let Some(s) = &mut self.sessions {
            if s.contains(&key) {
                return;
            }
            if s.len() >= MAX_SESSIONS {
                s.pop_front();
            }
            s.push_back(key);
        }
    }

    /// Remove `stream` and all its state, pinned or not.
    pub fn remove_stream(&mut self, stream: u32) {
        self.streams.remove(&stream);
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Node-wide counters.
    pub fn counters(&self) -> DataPathCounters {
        self.counters
    }

    /// Streams with state, and their traffic.
    pub fn streams(&self) -> impl Iterator<Item = (u32, StreamStats)> + '_ {
        self.streams.iter().map(|(id, s)| {
            let mut st = s.stats;
            st.given_up = s.gaps.stats().given_up;
            (*id, st)
        })
    }

    /// The traffic of `stream`, if it has state.
    pub fn stream(&self, stream: u32) -> Option<StreamStats> {
        self.streams().find(|(id, _)| *id == stream).map(|(_, s)| s)
    }

    /// Datagrams in the start cache of `stream`.
    pub fn cached(&self, stream: u32) -> usize {
        self.streams.get(&stream).map_or(0, |s| s.cache.len())
    }

    /// The upstream of `stream`: where live data last came from, or before any, the
    /// sender of the first datagram.
    pub fn upstream(&self, stream: u32) -> Option<SocketAddr> {
        self.streams.get(&stream).and_then(|s| s.upstream)
    }

    /// Replace the children of `stream`. Empty `children` removes the route and frees
    /// all the stream's state. New children get the start cache first, then the recent
    /// past it lacks (see the crate documentation). Returns `false`
    /// when the route was refused at the stream cap.
    pub fn set_route(&mut self, now: Instant, stream: u32, mut children: Vec<Child>) -> bool {
        if children.is_empty() {
            if let Some(st) = self.streams.get_mut(&stream) {
                if st.pinned {
                    st.children.clear();
                    st.stats.children = 0;
                } else {
                    self.streams.remove(&stream);
                }
            }
            return true;
        }
        if !self.streams.contains_key(&stream) && self.streams.len() >= self.config.max_streams {
            self.counters.stream_cap += 1;
            return false;
        }
        let per_ip = self.config.max_children_per_ip;
        let before = children.len();
        let mut seen: Vec<(std::net::IpAddr, usize)> = Vec::new();
        children.retain(|c| {
            let ip = c.addr.ip();
            match seen.iter_mut().find(|(a, _)| *a == ip) {
                Some((_, n)) if *n >= per_ip => false,
                Some((_, n)) => {
                    *n += 1;
                    true
                }
                None => {
                    seen.push((ip, 1));
                    true
                }
            }
        });
        self.counters.child_cap += (before - children.len()) as u64;
        if children.len() > self.config.max_children {
            self.counters.child_cap += (children.len() - self.config.max_children) as u64;
            children.truncate(self.config.max_children);
        }
        let depth = self.config.retransmit_depth;
        let nack = self.config.nack_config;
        let burst = self.config.resend_burst_bytes;
        let st = self
            .streams
            .entry(stream)
            .or_insert_with(|| Stream::new(depth, nack));
        let mut old = std::mem::take(&mut st.children);
        let joined = children
            .iter()
            .any(|c| !old.iter().any(|o| o.child.addr == c.addr));
        let (replay, recent) = if joined {
            let since = now
                .checked_sub(self.config.nack_config.give_up_after)
                .unwrap_or(now);
            let recent = st.buffer.recent(since, self.config.max_resend_per_nack);
            (st.cache.replay(now), recent)
        } else {
            (Vec::new(), Vec::new())
        };
        // A new child gets the start cache, then the stream's recent past (the last
        // latency budget of it, as resent datagrams) that the cache does not hold: a
        // node or a viewer that moved to us after losing its parent or its PoP gets
        // what it missed while the old one was dying at once, with the first live
        // datagrams, instead of a NACK for it a round trip later (through every hop
        // that took the stream only now); what it already has, it drops as duplicates.
        let cache_from = replay
            .first()
            .and_then(|d| MediaHeader::parse(&d[..d.len().min(HEADER_LEN)]).ok())
            .map(|h| h.seq);
        // Marked as resent once, for every new child.
        let recent: Vec<Bytes> = recent
            .into_iter()
            .filter(|s| cache_from.is_none_or(|c| ott_proto::older(*s, c)))
            .filter_map(|s| st.buffer.get(s))
            .map(|d| start_cache::marked(d, flags::RETRANSMIT))
            .collect();
        for child in children {
            if let Some(i) = old.iter().position(|o| o.child.addr == child.addr) {
                let mut kept = old.swap_remove(i);
                kept.child = child;
                st.children.push(kept);
                continue;
            }
            let mut budget = Budget::new(now, burst);
            for d in &replay {
                let payload = Self::owned_for(self.key.is_some(), d, &child.kind);
                self.transmits.push_back(Transmit {
                    to: child.addr,
                    payload,
                });
                self.counters.replayed += 1;
                self.counters.datagrams_out += 1;
            }
            for d in &recent {
                if !budget.take(now, d.len() as u64, self.config.resend_bytes_per_sec, burst) {
                    self.counters.resend_budget += 1;
                    break;
                }
                let payload = Self::owned_for(self.key.is_some(), d, &child.kind);
                self.transmits.push_back(Transmit {
                    to: child.addr,
                    payload,
                });
                self.counters.caught_up += 1;
                self.counters.datagrams_out += 1;
            }
            st.children.push(ChildState { child, budget });
        }
        st.stats.children = st.children.len();
        true
    }

    /// Keep state for `stream` even without children: a server's own stream, whose
    /// start cache must be ready for the first viewer. Counts against
    /// [`Config::max_streams`]; `false` when refused at the cap.
    pub fn pin_stream(&mut self, stream: u32) -> bool {
        if !self.streams.contains_key(&stream) && self.streams.len() >= self.config.max_streams {
            self.counters.stream_cap += 1;
            return false;
        }
        let depth = self.config.retransmit_depth;
        let nack = self.config.nack_config;
        self.streams
            .entry(stream)
            .or_insert_with(|| Stream::new(depth, nack))
            .pinned = true;
        true
    }

    /// `d` (as received, tagged when keyed) as one child gets it.
    fn owned_for(keyed: bool, d: &Bytes, kind: &ChildKind) -> Payload {
        let untagged = if keyed {
            d.len().saturating_sub(TAG_LEN)
        } else {
            d.len()
        };
        match kind {
            ChildKind::Member => Payload::Bytes(d.clone()),
            ChildKind::Strip => Payload::Bytes(d.slice(..untagged)),
            ChildKind::Session(k) => Payload::Bytes(Bytes::from(k.seal(&d[..untagged]))),
        }
    }

    /// A media datagram received at `now` from `from` (if known); `token` names it in
    /// the [`Payload::Input`]s queued for it.
    pub fn handle_media(
        &mut self,
        now: Instant,
        from: Option<SocketAddr>,
        datagram: &[u8],
        token: usize,
    ) -> Result<Accepted, Drop> {
        self.counters.datagrams_in += 1;
        self.counters.bytes_in += datagram.len() as u64;
        // With a key, the tag is checked before anything else is read.
        let opened = match (&self.sessions, &self.key) {
            (Some(sessions), _) => sessions
                .iter()
                .rev()
                .find_map(|k| k.open(datagram).ok())
                .map(<[u8]>::len),
            (None, Some(k)) => k.open_media(datagram).ok().map(<[u8]>::len),
            (None, None) => Some(datagram.len()),
        };
        self.opened(now, from, datagram, opened, token)
    }

    /// [`DataPath::handle_media`] past the tag check: `opened` is the length without the
    /// tag if the tag checked.
    fn opened(
        &mut self,
        now: Instant,
        from: Option<SocketAddr>,
        datagram: &[u8],
        opened: Option<usize>,
        token: usize,
    ) -> Result<Accepted, Drop> {
        let Some(untagged) = opened else {
            self.counters.auth_failed += 1;
            return Err(Drop::Auth);
        };
        let Ok(header) = MediaHeader::parse(&datagram[..untagged]) else {
            self.counters.malformed += 1;
            return Err(Drop::Malformed);
        };
        self.accept(now, from, datagram, None, untagged, header, token)
    }

    /// Media datagrams received together at `now` (one receive batch): the same, in
    /// the same order, as one [`DataPath::handle_media`] per datagram, but cheaper. The
    /// overlay tags of the batch are checked together, and the copies sealed for
    /// viewers are sealed together per viewer, after the batch (BLAKE3 over several
    /// datagrams side by side; [`ott_proto::auth::OverlayKey::check_media_many`]).
    /// `drops` is cleared and gets the position in `batch` and the reason of each
    /// datagram dropped.
    pub fn handle_media_batch(
        &mut self,
        now: Instant,
        batch: &[MediaIn<'_>],
        drops: &mut Vec<(usize, Drop)>,
    ) {
        drops.clear();
        if self.sessions.is_some() {
            // A viewer's: each datagram is tried against its session keys.
            for (i, m) in batch.iter().enumerate() {
                if let Err(why) = self.handle_media(now, m.from, m.datagram, m.token) {
                    drops.push((i, why));
                }
            }
            return;
        }
        let mut ok = std::mem::take(&mut self.scratch_ok);
        if let Some(k) = &self.key {
            let datagrams: Vec<&[u8]> = batch.iter().map(|m| m.datagram).collect();
            k.check_media_many(&datagrams, &mut ok, &mut self.scratch_digests);
        }
        let keyed = self.key.is_some();
        self.pending = Some((Vec::new(), 0));
        for (i, m) in batch.iter().enumerate() {
            self.counters.datagrams_in += 1;
            self.counters.bytes_in += m.datagram.len() as u64;
            let opened = if keyed {
                ok.get(i)
                    .copied()
                    .unwrap_or(false)
                    .then(|| m.datagram.len() - TAG_LEN)
            } else {
                Some(m.datagram.len())
            };
            if let Some((_, at)) = &mut self.pending {
                *at = i;
            }
            if let Err(why) = self.opened(now, m.from, m.datagram, opened, m.token) {
                drops.push((i, why));
            }
        }
        self.scratch_ok = ok;
        if let Some((seals, _)) = self.pending.take() {
            self.seal_pending(batch, seals);
        }
    }

    /// Make the seals [`DataPath::accept`] left for the end of a batch. Each datagram's
    /// bytes are hashed once, whatever the number of viewers (its digest from the
    /// overlay tag's check when keyed, else the digests of the datagrams sealed, side by
    /// side), and each seal is one compression of that digest with the viewer's key.
    fn seal_pending(&mut self, batch: &[MediaIn<'_>], seals: Vec<PendingSeal>) {
        if seals.is_empty() {
            return;
        }
        let keyed = self.key.is_some();
        let mut digests = std::mem::take(&mut self.scratch_digests);
        // Unkeyed: the digests of the inputs sealed, each once (their seals come in
        // input order, as `accept` queued them).
        if !keyed {
            let bodies: Vec<&[u8]> = seals
                .chunk_by(|a, b| a.input == b.input)
                .map(|g| {
                    batch
                        .get(g[0].input)
                        .map_or(&[][..], |m| &m.datagram[..g[0].len])
                })
                .collect();
            media_digests_many(&bodies, &mut digests);
        }
        let mut next = 0;
        for group in seals.chunk_by(|a, b| a.input == b.input) {
            let Some(m) = batch.get(group[0].input) else {
                continue;
            };
            let digest = if keyed {
                digests.get(group[0].input)
            } else {
                next += 1;
                digests.get(next - 1)
            };
            let Some(digest) = digest else {
                continue;
            };
            let body = &m.datagram[..group[0].len];
            for p in group {
                let mut sealed = Vec::with_capacity(body.len() + TAG_LEN);
                sealed.extend_from_slice(body);
                sealed.extend_from_slice(&p.key.tag_of(digest));
                if let Some(t) = self.transmits.get_mut(p.at) {
                    t.payload = Payload::Bytes(Bytes::from(sealed));
                }
            }
        }
        self.scratch_digests = digests;
    }

    /// A media datagram this node made (a server's, tagged when keyed) at `now`: kept
    /// for retransmission and the start cache (sharing `datagram`, no copy) and queued to
    /// the children of its stream. Its tag is not checked. `token` names it in the
    /// [`Payload::Input`]s queued for it.
    pub fn handle_local(
        &mut self,
        now: Instant,
        datagram: &Bytes,
        token: usize,
    ) -> Result<Accepted, Drop> {
        let untagged = if self.key.is_some() {
            datagram.len().saturating_sub(TAG_LEN)
        } else {
            datagram.len()
        };
        let Ok(header) = MediaHeader::parse(&datagram[..untagged]) else {
            self.counters.malformed += 1;
            return Err(Drop::Malformed);
        };
        self.accept(now, None, datagram, Some(datagram), untagged, header, token)
    }

    /// A datagram whose tag checked and whose header parsed: the per-stream logic.
    #[allow(clippy::too_many_arguments)]
    fn accept(
        &mut self,
        now: Instant,
        from: Option<SocketAddr>,
        datagram: &[u8],
        shared: Option<&Bytes>,
        untagged: usize,
        header: MediaHeader,
        token: usize,
    ) -> Result<Accepted, Drop> {
        let body = &datagram[..untagged];
        // Nothing is kept for a stream nobody here receives: no allocation at all.
        let Some(st) = self.streams.get_mut(&header.stream) else {
            self.counters.unrouted += 1;
            return Err(Drop::Unrouted);
        };
        st.stats.datagrams_in += 1;
        st.stats.bytes_in += datagram.len() as u64;
        match st.seen.accept(header.seq, now) {
            Verdict::New => {}
            Verdict::Switched => {
                self.counters.source_switches += 1;
                st.cache.clear();
                st.gaps = GapTracker::new(self.config.nack_config);
                st.buffer = RetransmitBuffer::new(self.config.retransmit_depth);
                self.events.push_back(DataPathEvent::SourceSwitched {
                    stream: header.stream,
                });
            }
            Verdict::Duplicate => {
                st.stats.duplicates += 1;
                self.counters.duplicates += 1;
                return Err(Drop::Duplicate);
            }
            Verdict::OtherSource => {
                st.stats.other_source += 1;
                self.counters.other_source += 1;
                return Err(Drop::OtherSource);
            }
        }
        if header.frag_index == 0 {
            st.stats.frames_in += 1;
        }
        let live = !header.has(flags::RETRANSMIT) && !header.has(flags::CACHED);
        if live {
            st.stats.last_live_in = Some(now);
        }
        // Live data names the upstream; until some comes, the sender of the first
        // (cached or resent) datagram does, so that gaps in a new child's first burst
        // are NACKed at once rather than after the first live datagram.
        if (live || st.upstream.is_none()) && from.is_some() && st.upstream != from {
            st.upstream = from;
            if let Some(from) = from {
                self.events.push_back(DataPathEvent::Upstream {
                    stream: header.stream,
                    from,
                });
            }
        }
        if self.config.nack {
            st.gaps
                .on_fragment(now, header.seq, header.frag_index, header.frag_count);
        }
        // One copy per datagram (not per child), shared by the retransmission buffer and
        // the start cache.
        let copy = match shared {
            Some(b) => b.clone(),
            None => Bytes::copy_from_slice(datagram),
        };
        st.cache.observe(now, &header, &copy);
        st.buffer.insert(header.seq, now, copy);
        for c in st.children.iter() {
            let payload = match &c.child.kind {
                ChildKind::Member => Payload::Input {
                    token,
                    len: datagram.len(),
                },
                ChildKind::Strip => Payload::Input {
                    token,
                    len: untagged,
                },
                // In a batch: sealed at its end, with the viewer's other datagrams.
                ChildKind::Session(k) => match &mut self.pending {
                    Some((seals, input)) => {
                        seals.push(PendingSeal {
                            at: self.transmits.len(),
                            key: k.clone(),
                            input: *input,
                            len: untagged,
                        });
                        Payload::Bytes(Bytes::new())
                    }
                    None => Payload::Bytes(Bytes::from(k.seal(body))),
                },
            };
            self.transmits.push_back(Transmit {
                to: c.child.addr,
                payload,
            });
        }
        let n = st.children.len() as u64;
        st.stats.datagrams_out += n;
        self.counters.datagrams_out += n;
        Ok(Accepted {
            header,
            len: untagged,
        })
    }

    /// A NACK for `stream` from `from` (decoded, and its seal checked, by the caller).
    /// Answered only for a current child of the stream, within its budget.
    pub fn handle_nack(
        &mut self,
        now: Instant,
        from: SocketAddr,
        stream: u32,
        ranges: &[NackRange],
    ) {
        self.counters.nacks_received += 1;
        let keyed = self.key.is_some();
        let Some(st) = self.streams.get_mut(&stream) else {
            self.counters.nacks_refused += 1;
            return;
        };
        // Only children may ask: no one can use us to reflect traffic elsewhere.
        let Some(c) = st.children.iter_mut().find(|c| c.child.addr == from) else {
            self.counters.nacks_refused += 1;
            return;
        };
        st.stats.nacks_received += 1;
        let limit = self.config.max_resend_per_nack;
        let asked: usize = ranges.iter().map(|r| usize::from(r.count)).sum();
        if asked > limit {
            self.counters.resend_budget += 1;
        }
        let mut answered = false;
        let mut oldest_unknown: Option<u32> = None;
        for seq in nacked_seqs(ranges, limit) {
            let Some(d) = st.buffer.get(seq) else {
                if oldest_unknown.is_none() {
                    oldest_unknown = Some(seq);
                }
                continue;
            };
            if !c.budget.take(
                now,
                d.len() as u64,
                self.config.resend_bytes_per_sec,
                self.config.resend_burst_bytes,
            ) {
                self.counters.resend_budget += 1;
                break;
            }
            let resent = start_cache::marked(d, flags::RETRANSMIT);
            let payload = Self::owned_for(keyed, &resent, &c.child.kind);
            self.transmits.push_back(Transmit { to: from, payload });
            answered = true;
            st.stats.retransmitted += 1;
            self.counters.retransmitted += 1;
            self.counters.datagrams_out += 1;
        }
        if answered {
            st.stats.nacks_answered += 1;
            self.counters.nacks_answered += 1;
        }
        // Asked for what passed before this node took the stream (it moved to us, or we
        // to a new parent, while an upstream was dying): ask our upstream in turn; what
        // comes back goes to every child, the asker among them.
        if let Some(seq) = oldest_unknown {
            if self.config.nack && st.upstream.is_some() && st.gaps.want_older(now, seq) {
                st.stats.nacks_relayed += 1;
                self.counters.nacks_relayed += 1;
            }
        }
    }

    /// When [`DataPath::handle_timeout`] is next due (a NACK to send), if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.config.nack {
            return None;
        }
        self.streams
            .values()
            .filter(|s| s.upstream.is_some())
            .filter_map(|s| s.gaps.poll_timeout())
            .min()
    }

    /// Time passed: queue the NACKs that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !self.config.nack {
            return;
        }
        for (id, st) in &mut self.streams {
            let Some(up) = st.upstream else { continue };
            while let Some((ranges, again)) = st.gaps.poll_nack_again(now) {
                // A NACK asking again goes twice (see `GapTracker::poll_nack_again`);
                // the upstream answers both, and the copy that comes second is dropped
                // as a duplicate.
                let copies = if again { 2 } else { 1 };
                for _ in 0..copies {
                    self.transmits.push_back(Transmit {
                        to: up,
                        payload: Payload::Nack {
                            stream: *id,
                            ranges: ranges.clone(),
                        },
                    });
                    st.stats.nacks_sent += 1;
                    self.counters.nacks_sent += 1;
                    self.counters.datagrams_out += 1;
                }
            }
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The queued datagrams, to send in one batch (then drop the drain).
    pub fn drain_transmits(&mut self) -> std::collections::vec_deque::Drain<'_, Transmit> {
        self.transmits.drain(..)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<DataPathEvent> {
        self.events.pop_front()
    }
}
