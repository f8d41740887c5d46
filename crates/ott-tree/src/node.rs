//! One overlay node's part of the distribution tree (SPEC §5).

use litemap::LiteMap;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ott_overlay::{ControlTransmit, LivenessConfig, NeighbourEvent, Neighbours, PeerAddrs, Role};
use ott_proto::auth::{viewer_cookie, SessionKey};
use ott_proto::{Message, NodeId, StreamId, StreamInfo};
use serde::Serialize;

/// Configuration of a [`Node`]. Build it with [`NodeConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id, as in the topology file.
    pub id: String,
    /// Server, relay or PoP.
    pub role: Role,
    /// Port of this node's media socket (on the same IP as its control socket), sent in `Join`.
    pub data_port: u16,
    /// Microseconds of a wall clock at the node's start (so it grows at each restart):
    /// a server numbers its announcements with its clock, `incarnation` plus the
    /// microseconds since its start, and nodes take routes only from announcements at
    /// least as new as those they already used (see [`NodeConfig::seq_slack`]).
    pub incarnation: u64,
    /// Heartbeat period and death timeout of neighbours; `liveness.keyed` says every
    /// message handed in passed a MAC check.
    pub liveness: LivenessConfig,
    /// How far a server's announcement `seq` may run ahead of time (default 2 s).
    ///
    /// Since a server's seq is its clock in µs, it grows about as fast as time: an
    /// announcement is refused (and counted in [`NodeStats::seq_too_far`]) when its seq
    /// is more than `elapsed + elapsed / 8 + seq_slack` (in µs) past the newest one
    /// accepted from that server, `elapsed` being the time since that one arrived.
    /// The slack covers differences in path delay; the eighth lets a genuine jump
    /// (a server's clock stepped forward) through in time. A forged announcement can
    /// thus take a server's routes at most that far ahead of its real announcements,
    /// which are then stale for as long.
    pub seq_slack: Duration,
    /// Servers: period of announcements (default 1 s). Other nodes expect a new seq from
    /// their parent this often: when none came for one and a half periods (lost on the
    /// way), they ask their parent for its announcement (a [`Message::RouteRequest`] of
    /// one hop), every half period until the route expires.
    pub announce_interval: Duration,
    /// Period of `Join` refreshes sent upstream (default 500 ms: seven refreshes per
    /// [`NodeConfig::join_expiry`]; with one a second, three lost in a row on an
    /// overlay link that crosses several lossy underlay links dropped a subscription
    /// now and then, and the media with it, with its parent alive).
    pub join_refresh: Duration,
    /// A child whose `Join` is not refreshed for this long is dropped (default 3.5 s).
    pub join_expiry: Duration,
    /// An offer whose seq has not changed for this long is forgotten (default 3.5 s):
    /// the same seq again (an answer to a route request, a new path) is no news of the
    /// server.
    pub route_expiry: Duration,
    /// Relative hysteresis: a better route must gain more than this fraction of the
    /// current latency before the parent changes (default 0.10).
    pub hysteresis_rel: f64,
    /// Absolute hysteresis: minimum gain for a parent change (default 1 ms).
    pub hysteresis_abs: Duration,
    /// Spread hysteresis: a better route must also gain more than this many times the
    /// measured spread (mean deviation) of the current or the better route's latency,
    /// whichever is smaller (default 5.0), so that jitter alone does not move the tree.
    pub hysteresis_spread: f64,
    /// After a parent change the new parent is kept this long unless it fails
    /// (default 300 ms).
    pub parent_hold: Duration,
    /// A better route must stay better (by the margins above) this long before the
    /// parent changes (default 500 ms), unless it is better by twice the margin: a
    /// spike of jitter does not last.
    pub better_for: Duration,
    /// Flap damping: for this long after a node left a parent for a route better by
    /// less than twice the margin (default 60 s), going back to that parent needs twice
    /// the margin, unless the route taken got worse since (a real change): its level (the
    /// slow mean of its offers plus the link's half RTT) by more than the margin, or its
    /// latency of the moment by more than one and a half margins, above where it stood
    /// when taken. Two routes of about the same latency under jitter would otherwise
    /// trade places every few seconds; a move for a gain of twice the margin or more (a
    /// real change, the tree forming) is no flap and damps nothing.
    pub flap_window: Duration,
    /// A parent suspected by [`Node::handle_upstream_silent`] is not taken as a parent
    /// for this long (default 1 s) unless it is the only way to the server.
    pub suspect_for: Duration,
    /// [`Message::RouteRequest`]s answered or forwarded per second, at most (default 64;
    /// a burst of as many is allowed).
    pub route_requests_per_s: u32,
    /// Hops a [`Message::RouteRequest`] may travel (default 16).
    pub route_request_hops: u8,
    /// Seed of the node's random choices (tie-breaks among equal offers).
    pub seed: u64,
    /// PoPs: the secret of viewers' cookies and session keys. The driver sets it from
    /// a random source (the default, all zeros, is only for tests: anyone could compute
    /// cookies).
    pub admission_secret: [u8; 32],
    /// PoPs: length of a cookie's time bucket (default 30 s). An echoed cookie is taken
    /// from the current or the previous bucket (so it lives 30 to 60 s); one from the
    /// previous bucket is answered with a fresh cookie too.
    pub cookie_bucket: Duration,
    /// PoPs: most viewers of one stream (default 512).
    pub max_viewers_per_stream: usize,
    /// PoPs: most viewer subscriptions (stream, data port) from one IP address
    /// (default 16).
    pub max_viewers_per_ip: usize,
}

impl NodeConfig {
    /// A configuration with the default timers.
    pub fn new(id: impl Into<String>, role: Role, data_port: u16) -> Self {
        Self {
            id: id.into(),
            role,
            data_port,
            incarnation: 0,
            liveness: LivenessConfig::default(),
            seq_slack: Duration::from_secs(2),
            announce_interval: Duration::from_secs(1),
            join_refresh: Duration::from_millis(500),
            join_expiry: Duration::from_millis(3500),
            route_expiry: Duration::from_millis(3500),
            hysteresis_rel: 0.10,
            hysteresis_abs: Duration::from_millis(1),
            hysteresis_spread: 5.0,
            parent_hold: Duration::from_millis(300),
            better_for: Duration::from_millis(500),
            flap_window: Duration::from_secs(60),
            suspect_for: Duration::from_secs(1),
            route_requests_per_s: 64,
            route_request_hops: 16,
            seed: 0,
            admission_secret: [0; 32],
            cookie_bucket: Duration::from_secs(30),
            max_viewers_per_stream: 512,
            max_viewers_per_ip: 16,
        }
    }
}

/// What a [`Node`] tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The parent towards `server` changed (`new: None`: no route any more).
    ParentChanged {
        /// The server whose tree changed.
        server: String,
        /// Previous parent.
        old: Option<String>,
        /// New parent.
        new: Option<String>,
    },
    /// A neighbour is alive (first heard, or back).
    NeighbourUp(String),
    /// A neighbour is dead (silent, or said bye).
    NeighbourDown(String),
    /// The full new set of data addresses to send `stream` to (children nodes at their
    /// data port, clients at theirs). Emitted whenever it changes, also to empty.
    Forwarding {
        /// The stream.
        stream: StreamId,
        /// Data addresses of the children, sorted.
        children: Vec<SocketAddr>,
        /// The children that are viewers, each with its session key: media to them
        /// carries a tag made with it (the others are overlay members).
        sessions: Vec<(SocketAddr, SessionKey)>,
    },
}

/// Counters of a [`Node`].
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct NodeStats {
    /// Messages that made no sense (bad announce path, stream id not matching, ...).
    pub malformed: u64,
    /// Messages from an address that is no neighbour's, or whose claimed id is not the
    /// neighbour owning the address (clients excepted).
    pub unknown_sender: u64,
    /// Announcements refused because their seq ran too far ahead of the newest one
    /// accepted from the same server (see [`NodeConfig::seq_slack`]).
    pub seq_too_far: u64,
    /// Valid messages ignored: stale seq, dead sender, offers through ourselves, ...
    pub ignored: u64,
    /// Announcements received.
    pub announces_in: u64,
    /// Announcements sent.
    pub announces_out: u64,
    /// Withdraws received.
    pub withdraws_in: u64,
    /// Withdraws sent.
    pub withdraws_out: u64,
    /// Joins received (refreshes included).
    pub joins_in: u64,
    /// Joins sent (refreshes included).
    pub joins_out: u64,
    /// Silence hints ignored because the parent was heard from within about a
    /// heartbeat interval (alive: the break is further up the path).
    pub upstream_silent_parent_alive: u64,
    /// `Avoid` messages received (see [`Message::Avoid`]).
    pub avoids_in: u64,
    /// `Avoid` messages sent to an upstream.
    pub avoids_out: u64,
    /// Streams taken from a neighbour other than the parent because the parent's path
    /// went through a node a child asked to avoid (counted at each such choice).
    pub avoiding_upstreams: u64,
    /// Leaves received.
    pub leaves_in: u64,
    /// Leaves sent.
    pub leaves_out: u64,
    /// Probes answered.
    pub probes_in: u64,
    /// Errors sent to clients.
    pub errors_out: u64,
    /// Parent changes, all servers together.
    pub parent_changes: u64,
    /// Routes to a server lost: the parent went and no other neighbour offered one.
    pub routes_lost: u64,
    /// Cookies sent to viewers (answers to a first `Join`, or to a stale cookie).
    pub cookies_out: u64,
    /// Viewer messages (`ViewerJoin`, `ViewerLeave`) whose cookie did not verify for
    /// their address and port (forged, or older than two buckets).
    pub bad_cookie: u64,
    /// Viewers admitted or refreshed (valid `ViewerJoin`s).
    pub viewer_joins: u64,
    /// Viewer requests refused because this node is not a PoP (only PoPs take viewers).
    pub viewer_not_pop: u64,
    /// Viewers refused because the stream had `max_viewers_per_stream` viewers.
    pub viewer_cap_stream: u64,
    /// Viewers refused because their IP address had `max_viewers_per_ip` subscriptions.
    pub viewer_cap_ip: u64,
    /// Parent changes made because the parent failed (died, withdrew, went stale or
    /// was suspected), as opposed to moves to a better route.
    pub failovers: u64,
    /// Parents suspected after a silence of their media ([`Node::handle_upstream_silent`]),
    /// or on a neighbour's route request or a first child's `Join` while they were quiet.
    pub suspect_parents: u64,
    /// Of those, suspected on a neighbour's route request (the parent had not been
    /// heard for a heartbeat interval).
    pub suspect_on_request: u64,
    /// Of those, suspected when a first child (a viewer moving here, a node) subscribed
    /// a stream that would come through them (the parent had not been heard for a
    /// heartbeat interval).
    pub suspect_on_join: u64,
    /// Of those, suspected because the parent itself asked us for a route: it lost
    /// its own, or suspects its parent and has no way round. Heartbeats still come
    /// from it, and its media stopped: without this, the nodes and viewers below it
    /// would wait until the dead node is declared dead.
    pub suspect_parent_asking: u64,
    /// Route requests sent because a suspected parent was still the only way.
    pub suspect_route_requests: u64,
    /// Viewers not told at once when their stream's parent was suspected, because a
    /// neighbour offered a way round it that was not feasible yet (see
    /// `viewers_warned`), counted per stream.
    pub warnings_held: u64,
    /// Viewers told that their stream's path is lost (a `Withdraw`) because its
    /// suspected parent was still the only way, so that they move to another PoP.
    pub viewers_warned: u64,
    /// Silence hints received from the data plane.
    pub upstream_silent_hints: u64,
    /// [`Message::RouteRequest`]s sent (our own and forwarded ones).
    pub route_requests_out: u64,
    /// [`Message::RouteRequest`]s received and answered (with an announcement, a fresh
    /// one on a server, or by forwarding).
    pub route_requests_answered: u64,
    /// [`Message::RouteRequest`]s dropped by the rate limit.
    pub route_requests_limited: u64,
    /// Announcements sent outside the periodic flood: answers to route requests and
    /// the servers' fresh announcements they trigger.
    pub triggered_announces: u64,
    /// Route requests of one hop sent to the parent because its announcements stopped
    /// coming for one and a half periods (lost on the way, under loss): its answer
    /// carries the seq missed, before the route expires.
    pub route_refreshes: u64,
}

/// A neighbour in [`NodeStatus`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NeighbourStatus {
    /// Node id.
    pub id: String,
    /// Alive now.
    pub alive: bool,
    /// Smoothed RTT in ms.
    pub rtt_ms: Option<f64>,
}

/// A stream in [`NodeStatus`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StreamStatus {
    /// Data-plane id.
    pub id: u32,
    /// Parent node the stream is joined at (`None` at its server, or when not joined).
    pub upstream: Option<String>,
    /// Child node ids, or `client@ip:port` for clients.
    pub children: Vec<String>,
}

/// The route towards one server in [`NodeStatus`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteStatus {
    /// The server.
    pub server: String,
    /// The chosen parent.
    pub parent: Option<String>,
    /// Node ids from the server to this node, inclusive (empty without a route).
    pub path: Vec<String>,
    /// Accumulated latency from the server, ms.
    pub latency_ms: Option<f64>,
    /// Number of hops from the server.
    pub hops: Option<u32>,
}

/// A snapshot of a [`Node`], for `/status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeStatus {
    /// Node id.
    pub id: String,
    /// `server`, `relay` or `pop`.
    pub role: String,
    /// Parent towards the best server.
    pub parent: Option<String>,
    /// Path from the best server to this node, inclusive.
    pub path: Vec<String>,
    /// Latency from the best server, ms.
    pub latency_ms: Option<f64>,
    /// Hops from the best server.
    pub hops: Option<u32>,
    /// Every neighbour.
    pub neighbours: Vec<NeighbourStatus>,
    /// Every reachable stream by name, with its children and upstream.
    pub streams: BTreeMap<String, StreamStatus>,
    /// The route to every known server.
    pub servers: Vec<RouteStatus>,
}

#[derive(Debug, Clone)]
struct Offer {
    /// Position of the neighbour that made it in the neighbour table
    /// ([`Neighbours::index_of`]): its RTT is read there after every input without
    /// reading the neighbour's id.
    nb: Option<usize>,
    path: Vec<NodeId>,
    /// Whether `path` holds our id, found once when the offer is stored (`path` never
    /// changes after): the loop check reads it after every step, and walking the path
    /// there cost a cache miss per hop.
    through_us: bool,
    latency_us: u64,
    seq: u64,
    at: Instant,
    catalogue: Vec<StreamInfo>,
    /// The last effective latency (offer plus half the link RTT) sampled at an
    /// announcement, µs (none before the link's RTT was measured), and the smoothed
    /// difference between successive samples: the measured spread.
    last_us: Option<u64>,
    dev_us: u64,
    /// The slow mean (1/8 per announcement) of the latency offered, µs: with the link's
    /// half RTT of the moment (itself smoothed, and quick to show a change of the link),
    /// the level a route taken at a low of its jitter drifts back to.
    avg_us: u64,
}

#[derive(Debug, Default, Clone)]
struct Route {
    /// The latest offer of each neighbour.
    offers: LiteMap<String, Offer>,
    parent: Option<String>,
    /// Seq of the last announcement we passed on (with the current parent).
    sent_seq: Option<u64>,
    /// Whether neighbours were told we have no route.
    withdrawn: bool,
    /// Feasibility distance: the newest announcement seq we took a route from, and the
    /// fewest hops we had (and may have told anyone) with that seq. See
    /// [`Node::feasible`].
    fd: Option<(u64, u32)>,
    /// The newest announcement seq accepted from this server, and when: the next may
    /// not run too far ahead of it (see [`NodeConfig::seq_slack`]).
    newest: Option<(u64, Instant)>,
    /// When the parent last changed (for [`NodeConfig::parent_hold`]).
    changed_at: Option<Instant>,
    /// The neighbour that has offered a better route than the parent's since when (for
    /// [`NodeConfig::better_for`]).
    better: Option<(String, Instant)>,
    /// The parent last left for a marginally better route, and when (for
    /// [`NodeConfig::flap_window`]).
    /// With the effective latency (µs) of the route taken then.
    left: Option<(String, Instant, u64)>,
    /// When the route was lost (no feasible offer), while it is lost.
    lost_at: Option<Instant>,
    /// When we last sent a route request for this server (ours or forwarded), and its seq.
    requested: Option<(Instant, u64)>,
    /// When we last asked the parent for a seq it has not sent us (see
    /// [`NodeConfig::announce_interval`]).
    refreshed: Option<Instant>,
    /// When the parent's offer was made (`offers[parent].at`), kept by
    /// [`Route::sync_offer_times`] wherever the parent or the offers change: every input
    /// asks [`Node::refresh_due`] for it, and finding it in `offers` compared ids.
    parent_at: Option<Instant>,
    /// When the oldest offer was made (the least `at` of `offers`), kept with
    /// `parent_at`: [`Node::poll_timeout`] and [`Node::update`] read it after every
    /// input instead of every offer.
    oldest_at: Option<Instant>,
    /// The neighbours with an offer, by position in the neighbour table ([`Offer::nb`]):
    /// bit `i` for neighbour `i` below 63, bit 63 for any further one. Kept with
    /// `parent_at`: whether an ack's sender offers a route is then read from the route
    /// itself, not from its offers (each a cache miss at 10,000 nodes).
    offered_by: u64,
    /// The position of the parent's offer in `offers` (none without one), kept with
    /// `parent_at`: the parent choice finds the parent among its candidates by it,
    /// without comparing ids.
    parent_pos: Option<usize>,
}

/// [`Route::offered_by`]'s bits for these offers.
fn offer_mask<'a>(offers: impl Iterator<Item = &'a Offer>) -> u64 {
    offers
        .filter_map(|o| o.nb)
        .fold(0, |m, i| m | 1 << i.min(63))
}

impl Route {
    /// Set `parent_at` from the parent and its offer, `oldest_at` and `offered_by` from
    /// the offers; called after each change of the parent or the offers.
    fn sync_offer_times(&mut self) {
        self.parent_at = self
            .parent
            .as_deref()
            .and_then(|p| self.offers.get(p))
            .map(|o| o.at);
        self.oldest_at = self.offers.values().map(|o| o.at).min();
        self.offered_by = offer_mask(self.offers.values());
        self.parent_pos = self.find_parent();
    }

    /// The position of the parent's offer, found by its id.
    fn find_parent(&self) -> Option<usize> {
        let p = self.parent.as_deref()?;
        self.offers.find_index(p).ok()
    }

    /// `parent_pos`, checked against the parent and the offers in debug builds.
    fn parent_pos(&self) -> Option<usize> {
        debug_assert_eq!(
            self.parent_pos,
            self.find_parent(),
            "Route::parent_pos out of step with the parent's offer"
        );
        self.parent_pos
    }

    /// Whether neighbour `i` (its position in the neighbour table) has an offer here.
    fn offered_by(&self, i: usize) -> bool {
        debug_assert_eq!(
            self.offered_by,
            offer_mask(self.offers.values()),
            "Route::offered_by out of step with the offers"
        );
        match i {
            0..=62 => self.offered_by >> i & 1 == 1,
            // Beyond the mask's bits: look at the offers when one may be its.
            _ => self.offered_by >> 63 == 1 && self.offers.values().any(|o| o.nb == Some(i)),
        }
    }

    /// `parent_at`, checked against the parent's offer in debug builds.
    fn parent_at(&self) -> Option<Instant> {
        debug_assert_eq!(
            self.parent_at,
            self.parent
                .as_deref()
                .and_then(|p| self.offers.get(p))
                .map(|o| o.at),
            "Route::parent_at out of step with the parent's offer"
        );
        self.parent_at
    }

    /// `oldest_at`, checked against the offers in debug builds.
    fn oldest_at(&self) -> Option<Instant> {
        debug_assert_eq!(
            self.oldest_at,
            self.offers.values().map(|o| o.at).min(),
            "Route::oldest_at out of step with the offers"
        );
        self.oldest_at
    }

    /// How long to wait for the answer to a route request before asking again: three
    /// times the shortest one-way latency to the server a neighbour offers (the request
    /// goes up and a fresh announcement comes back) plus 20 ms, within
    /// [`RR_RETRY_MIN`]..=[`RR_RETRY`]. Under loss a request or its answer over several
    /// overlay hops is lost often (about half the time over six hops of a tenth each);
    /// a retry after a fixed 250 ms kept a PoP without a route for 575 ms after a kill.
    fn rr_retry(&self) -> Duration {
        let Some(lat) = self.offers.values().map(|o| o.latency_us).min() else {
            return RR_RETRY;
        };
        let wait = Duration::from_micros(lat.saturating_mul(3)) + Duration::from_millis(20);
        wait.clamp(RR_RETRY_MIN, RR_RETRY)
    }
}

#[derive(Debug, Clone)]
struct Child {
    node: Option<String>,
    expires: Instant,
    /// Port its control messages come from (a client's `Withdraw` goes there).
    ctrl_port: u16,
    /// A viewer's session key (`None` for overlay members).
    session: Option<SessionKey>,
    /// Nodes the stream's path to this child should not go through ([`Message::Avoid`];
    /// sorted, at most [`ott_proto::MAX_AVOID`]), held as long as the subscription.
    avoid: Vec<NodeId>,
    /// Until when `avoid` holds: each `Avoid` (repeated with each `Join`) renews it
    /// for the join expiry.
    avoid_until: Option<Instant>,
}

#[derive(Debug, Default, Clone)]
struct StreamState {
    children: BTreeMap<SocketAddr, Child>,
    upstream: Option<String>,
    /// When we joined the current upstream: silence before media could flow is no hint.
    joined_at: Option<Instant>,
    next_refresh: Option<Instant>,
    /// Refreshes still to come after `quick_every` rather than the refresh period: a
    /// `Join` lost on the way to a new parent costs that, not a whole period of media.
    quick_joins: u8,
    /// About a round trip to the upstream (see [`QUICK_JOINS`]).
    quick_every: Duration,
    last_forwarding: Vec<SocketAddr>,
    /// The avoid set last sent to the upstream (empty: none).
    sent_avoid: Vec<NodeId>,
}

/// Queue a `Withdraw` naming no server (every path to the stream is gone, or about to
/// be) to each viewer among `children`; returns how many.
fn withdraw_to_viewers(
    children: &BTreeMap<SocketAddr, Child>,
    me: &str,
    transmits: &mut VecDeque<ControlTransmit>,
) -> u64 {
    let mut sent = 0;
    for (addr, c) in children.iter().filter(|(_, c)| c.node.is_none()) {
        transmits.push_back(ControlTransmit {
            to: SocketAddr::new(addr.ip(), c.ctrl_port),
            msg: withdraw(me, "", 0),
        });
        sent += 1;
    }
    sent
}

/// "`from` has no path to `server` any more (as of announcement `seq`)."
fn withdraw(from: &str, server: &str, seq: u64) -> Message {
    Message::Withdraw {
        from: from.to_owned(),
        server: server.to_owned(),
        seq,
    }
}

/// A route's (effective latency µs, hops).
type Metric = (u64, u32);
/// A route's measured spreads, µs: of its announced latency, and of its first link's
/// half RTT.
type Spreads = (u64, u64);

/// The feasibility distance after taking or advertising a route of (`seq`, `hops`): it
/// only ever moves to a newer seq, or to fewer hops at the same seq.
/// What [`Node::choose_parent`] found for one route, for [`Node::select_parent`] to
/// apply.
struct Choice {
    /// (seq, hops) of the offer taken, kept or new: the feasibility distance moves there.
    taken: Option<(u64, u32)>,
    /// A better offer waiting out `better_for`, and since when.
    better: Option<(String, Instant)>,
    had_parent: bool,
    /// No feasible offer left.
    lost: bool,
    /// The parent had left the candidates.
    failed: bool,
    /// (old, new) parent, when it changes.
    change: Option<(Option<String>, Option<String>)>,
    /// For the log: see `select_parent`.
    marginal: Option<u64>,
    weighed: Option<(u64, u64, u64, u64)>,
}

fn advance_fd(fd: Option<(u64, u32)>, seq: u64, hops: u32) -> (u64, u32) {
    match fd {
        Some((s, h)) if s == seq => (s, h.min(hops)),
        Some((s, h)) if s > seq => (s, h),
        _ => (seq, hops),
    }
}

/// One overlay node's distribution-tree state machine: announcements, parent choice per
/// server, soft-state subscriptions and answers to clients. See the crate docs.
#[derive(Debug, Clone)]
pub struct Node {
    config: NodeConfig,
    nb: Neighbours,
    rng: fastrand::Rng,
    own_catalogue: Vec<StreamInfo>,
    /// Seq of the last announcement this node made as a server.
    own_seq: u64,
    /// When the node started: its announcement seq is `incarnation` plus the µs since.
    started: Instant,
    next_announce: Option<Instant>,
    routes: LiteMap<String, Route>,
    streams: BTreeMap<StreamId, StreamState>,
    transmits: VecDeque<ControlTransmit>,
    events: VecDeque<Event>,
    stats: NodeStats,
    shut: bool,
    /// Bumped whenever a parent or an upstream changes (see [`Node::pointer_version`]).
    pointer_version: u64,
    /// Neighbours suspected of not forwarding media, until when.
    suspects: BTreeMap<String, Instant>,
    /// Token bucket of route requests handled: tokens and when it was last filled.
    rr_tokens: f64,
    rr_filled: Instant,
    /// The time of the last input, for decisions made below `update`.
    now: Instant,
    /// Servers only: when the last fresh announcement triggered by a route request went.
    last_triggered: Option<Instant>,
    /// Until when [`Node::update`] would do nothing new if nothing it reads changed
    /// ([`Node::deadlines`] as of the last update); `None` once anything may have
    /// changed. A heartbeat from a neighbour already alive changes nothing it reads,
    /// nor does an ack from one that offers no route or a timer that only sends
    /// heartbeats; about half of all messages are such heartbeats.
    quiet_until: Option<Instant>,
    /// [`Node::own_timeout`] as of the last update, valid while `quiet_until` is set.
    own_timeout: Option<Instant>,
    /// Calls of `handle`, `handle_timeout`, `handle_upstream_silent`, `set_catalogue`
    /// and `shutdown`.
    inputs: u64,
    /// Updates skipped that way (in debug builds every 16th is checked against a full
    /// update on a copy).
    updates_skipped: u64,
    /// Whether a feasibility distance moved during the running update (see
    /// [`Node::update_last`]).
    fd_moved: bool,
}

/// A node without a route repeats its route request at most this long apart (sooner
/// on a short way to the server, [`Route::rr_retry`]) ...
const RR_RETRY: Duration = Duration::from_millis(250);
/// ... and at least this long apart.
const RR_RETRY_MIN: Duration = Duration::from_millis(50);
/// ... for this long after losing the route.
const RR_GIVE_UP: Duration = Duration::from_secs(3);

/// How much longer than a heartbeat interval a parent may be unheard and still count as
/// alive when its media stops (see [`Node::handle_upstream_silent`]).
const PARENT_HEARD_SLACK: Duration = Duration::from_millis(20);

/// After a `Join` at a new parent, it is repeated this soon ([`QUICK_JOINS`] times in
/// all) before the refresh period takes over: on a lossy link a lost first `Join` held
/// a PoP's media up for a whole refresh period (1 s), the parent being alive.
const JOIN_RETRY: Duration = Duration::from_millis(200);
/// `Join`s sent at a new parent before the refresh period takes over: the first, then
/// one every round trip or so (twice the link's RTT plus [`QUICK_JOIN_SLACK`], at least
/// [`QUICK_JOIN_MIN`], at most [`JOIN_RETRY`]). A repeated `Join` costs the parent
/// nothing: a child already served is not sent the start cache again. With 3 % loss on
/// each of the underlay links an overlay link crosses, two `Join`s in a row are lost
/// often enough that a repeat 200 ms later held a stream up past the viewers' budget.
const QUICK_JOINS: u8 = 5;
/// See [`QUICK_JOINS`].
const QUICK_JOIN_SLACK: Duration = Duration::from_millis(10);
/// See [`QUICK_JOINS`].
const QUICK_JOIN_MIN: Duration = Duration::from_millis(20);

/// `a == b` for node ids, looking at the last byte before the rest: ids of one overlay
/// often have the same length and prefix (`r0412`, `r0413`), where a plain comparison
/// is a call to `memcmp` for every pair.
#[inline]
fn same_id(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.last() == b.last() && a == b
}

/// `avg` moved an eighth of the way to `sample` (an EWMA of gain 1/8).
fn eighth_toward(avg: u64, sample: u64) -> u64 {
    if sample >= avg {
        avg + (sample - avg) / 8
    } else {
        avg - (avg - sample) / 8
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Node {
    /// A node with its overlay `neighbours`, each with a single address (id, control
    /// address). `epoch` is the origin of its wire timestamps. Servers announce from
    /// their first `handle_timeout`. See [`Node::with_peers`] for neighbours with
    /// several addresses.
    pub fn new(
        config: NodeConfig,
        neighbours: Vec<(String, SocketAddr)>,
        epoch: Instant,
        now: Instant,
    ) -> Self {
        let peers = neighbours.into_iter().map(PeerAddrs::from).collect();
        Self::with_peers(config, peers, epoch, now)
    }

    /// A node with its overlay `neighbours` as the bootstrapper gave them: for each, its
    /// id, the control address to send to and every control address it may send from
    /// ([`PeerAddrs`]). Messages that only neighbours send are accepted only from these
    /// addresses. `epoch` is the origin of its wire timestamps. Servers announce from
    /// their first `handle_timeout`.
    pub fn with_peers(
        config: NodeConfig,
        neighbours: Vec<PeerAddrs>,
        epoch: Instant,
        now: Instant,
    ) -> Self {
        let nb = Neighbours::with_peers(
            config.id.clone(),
            config.incarnation,
            epoch,
            config.liveness,
            neighbours,
            now,
        );
        let next_announce = (config.role == Role::Server).then_some(now);
        let mut me = Self {
            rng: fastrand::Rng::with_seed(config.seed),
            config,
            nb,
            own_catalogue: Vec::new(),
            own_seq: 0,
            started: now,
            next_announce,
            routes: LiteMap::new(),
            streams: BTreeMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: NodeStats::default(),
            shut: false,
            pointer_version: 0,
            suspects: BTreeMap::new(),
            rr_tokens: 0.0,
            rr_filled: now,
            now,
            last_triggered: None,
            quiet_until: None,
            own_timeout: None,
            inputs: 0,
            updates_skipped: 0,
            fd_moved: false,
        };
        me.rr_tokens = f64::from(me.config.route_requests_per_s);
        me.pump_neighbours(now);
        me
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// This node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The neighbour table (liveness, RTT).
    pub fn neighbours(&self) -> &Neighbours {
        &self.nb
    }

    /// Servers only: the streams this node originates, announced from the next
    /// announcement on (which is made at once).
    pub fn set_catalogue(&mut self, now: Instant, streams: Vec<StreamInfo>) {
        self.begin_input();
        self.own_catalogue = streams;
        if self.config.role == Role::Server && !self.shut {
            self.next_announce = Some(now);
            self.handle_timeout(now);
        }
    }

    /// Feed one decoded control message received from `from`. Never panics: malformed,
    /// stale or unknown input is counted in [`Node::stats`] and dropped.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, msg: Message) {
        let quiet = self.begin_input();
        if self.shut {
            return;
        }
        self.now = now;
        // Whether a liveness message can change nothing the update reads besides
        // what makes an event: a heartbeat moves no RTT, and an ack moves only its
        // sender's, which no candidate parent reads when it offers no route (a
        // child: its path runs through us).
        let inert = match &msg {
            Message::Heartbeat { .. } => true,
            Message::HeartbeatAck { from: id, .. } => !self.offers_from(id),
            _ => false,
        };
        // The offers, for what may weigh them (an inert message weighs them only if it
        // brings a neighbour up or down, rare).
        if !inert {
            self.prefetch_offers();
        }
        if self.nb.handle(now, from, &msg) {
            let events = self.pump_neighbours(now);
            // Such a message that brought no neighbour up, down or back changed nothing
            // the update reads, and until `quiet` no time condition of it flips; nor
            // did an ack whose RTT sample leaves the parent choice as it was.
            let skipped = !events
                && match &msg {
                    _ if inert => self.skip_update(now, quiet),
                    Message::HeartbeatAck { .. } => self.reweigh(now, quiet),
                    _ => false,
                };
            if !skipped {
                self.update_last(now);
            }
            return;
        }
        match msg {
            Message::Announce {
                server,
                seq,
                path,
                latency_us,
                catalogue,
            } => self.on_announce(now, from, server, seq, path, latency_us, catalogue),
            Message::Withdraw {
                from: claimed,
                server,
                ..
            } => {
                self.stats.withdraws_in += 1;
                match self.nb.id_of(from).map(str::to_owned) {
                    Some(n) if n == claimed => {
                        if let Some(r) = self.routes.get_mut(&server) {
                            r.offers.remove(&n);
                            r.sync_offer_times();
                        }
                    }
                    _ => self.stats.unknown_sender += 1,
                }
            }
            Message::RouteRequest {
                from: claimed,
                server,
                seq,
                hops_left,
            } => self.on_route_request(now, from, &claimed, &server, seq, hops_left),
            Message::Join {
                stream,
                data_port,
                from: node,
            } => self.on_join(now, from, stream, data_port, node),
            Message::Avoid {
                stream,
                data_port,
                avoid,
            } => self.on_avoid(now, from, stream, data_port, avoid),
            Message::Leave { stream, data_port } => {
                self.stats.leaves_in += 1;
                // Only a neighbour leaves this way (a viewer proves its address with its
                // cookie in `ViewerLeave`), and only its own subscription.
                let Some(n) = self.nb.id_of(from).map(str::to_owned) else {
                    self.stats.unknown_sender += 1;
                    self.update(now);
                    return;
                };
                let key = SocketAddr::new(from.ip(), data_port);
                let st = self.streams.get_mut(&stream);
                let owned = st
                    .as_ref()
                    .and_then(|s| s.children.get(&key))
                    .is_some_and(|c| c.node.as_deref() == Some(n.as_str()));
                match st {
                    Some(st) if owned => {
                        st.children.remove(&key);
                    }
                    _ => self.stats.ignored += 1,
                }
            }
            Message::ViewerJoin {
                stream,
                data_port,
                cookie,
            } => self.on_viewer_join(now, from, stream, data_port, cookie),
            Message::ViewerLeave {
                stream,
                data_port,
                cookie,
            } => {
                self.stats.leaves_in += 1;
                let data = SocketAddr::new(from.ip(), data_port);
                if self.config.role != Role::Pop {
                    self.stats.viewer_not_pop += 1;
                } else if self.cookie_age(now, data, cookie).is_none() {
                    self.stats.bad_cookie += 1;
                } else {
                    let st = self.streams.get_mut(&stream);
                    let viewer = st
                        .as_ref()
                        .and_then(|s| s.children.get(&data))
                        .is_some_and(|c| c.node.is_none());
                    match st {
                        Some(st) if viewer => {
                            st.children.remove(&data);
                        }
                        _ => self.stats.ignored += 1,
                    }
                }
            }
            Message::Probe { nonce, sent_us } => {
                self.stats.probes_in += 1;
                let (lat, hops) = self.best_route_metric();
                let viewers = self.viewers();
                let path = self.probe_path(from);
                self.transmits.push_back(ControlTransmit {
                    to: from,
                    msg: Message::ProbeReply {
                        nonce,
                        echo_us: sent_us,
                        pop: self.config.id.clone(),
                        path_latency_us: lat,
                        hops: hops.unwrap_or(0),
                        viewers,
                        path,
                    },
                });
            }
            Message::ListStreams => self.transmits.push_back(ControlTransmit {
                to: from,
                msg: Message::Streams {
                    streams: self.catalogue(),
                },
            }),
            other => {
                tracing::debug!(%from, kind = other.kind(), "ignoring message");
                self.stats.ignored += 1;
            }
        }
        self.update_last(now);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_announce(
        &mut self,
        now: Instant,
        from: SocketAddr,
        server: String,
        seq: u64,
        path: Vec<NodeId>,
        latency_us: u64,
        catalogue: Vec<StreamInfo>,
    ) {
        self.stats.announces_in += 1;
        let Some(n) = self.nb.id_of(from).map(str::to_owned) else {
            self.stats.unknown_sender += 1;
            return;
        };
        let well_formed = path.first() == Some(&server)
            && path.last() == Some(&n)
            && catalogue
                .iter()
                .all(|s| s.id == ott_proto::stream_id_for(&s.name));
        if !well_formed {
            self.stats.malformed += 1;
            return;
        }
        if server == self.config.id || !self.nb.is_alive(&n) {
            self.stats.ignored += 1;
            return;
        }
        let rtt_half = self.nb.rtt(&n).map(|r| micros(r) / 2);
        let nb = self.nb.index_of(&n);
        let route = self.routes.entry(server.clone()).or_default();
        if path.iter().any(|x| same_id(x, &self.config.id)) {
            // The neighbour now reaches the server through us: its old offer is void.
            route.offers.remove(&n);
            route.sync_offer_times();
            self.stats.ignored += 1;
            return;
        }
        // Older than what we have, or stale at the same seq: a node takes a route at the
        // same seq only if it is strictly shorter (the feasibility condition), so at one
        // seq the paths a neighbour announces only get shorter. A longer or equally long
        // other path at the seq we hold is an announcement overtaken on the way (jitter
        // reorders datagrams); taking it would make our own route look unfeasible.
        if route.offers.get(&n).is_some_and(|o| {
            o.seq > seq || (o.seq == seq && o.path != path && path.len() >= o.path.len())
        }) {
            self.stats.ignored += 1;
            return;
        }
        if let Some((newest, at)) = route.newest {
            let elapsed = micros(now.saturating_duration_since(at));
            let allowed = newest
                .saturating_add(elapsed)
                .saturating_add(elapsed / 8)
                .saturating_add(micros(self.config.seq_slack));
            if seq > allowed {
                tracing::debug!(%server, seq, newest, "announcement seq too far ahead, refused");
                self.stats.seq_too_far += 1;
                return;
            }
        }
        if route.newest.is_none_or(|(newest, _)| seq > newest) {
            route.newest = Some((seq, now));
        }
        // The measured spread of this neighbour's route: EWMA (1/8) of the difference
        // between successive samples of its effective latency, one sample per
        // announcement. Successive differences, not deviations from a running mean: a
        // mean lags behind the slow drift of a forming tree (every node's RTTs and
        // offers settle over seconds), and that lag read as spread kept margins wide
        // for tens of seconds. A sample taken before the link's RTT is measured is no
        // sample, and a new path is a new route (the step to it is no jitter); the
        // spread measured so far is kept as the link's noise. The step of a real change
        // widens it too (a difference counted at most at a few times the spread held
        // fewer nodes on a route 20 ms worse, but let the emulated links' jitter move
        // nodes where it starts, on every link at once).
        let sample = rtt_half.map(|h| latency_us.saturating_add(h));
        let prev = route.offers.get(&n);
        let (last_us, dev_us) = match prev {
            Some(o) if o.path != path => (sample, o.dev_us),
            Some(o) => match (o.last_us, sample) {
                (Some(last), Some(sample)) => {
                    let diff = sample.abs_diff(last);
                    (Some(sample), eighth_toward(o.dev_us, diff))
                }
                (last, None) => (last, o.dev_us),
                (None, sample) => (sample, o.dev_us),
            },
            None => (sample, 0),
        };
        // The route's level upstream: a slow mean (1/8 per announcement) of the latency
        // offered, started over on a new path.
        let avg_us = match prev {
            Some(o) if o.path == path => eighth_toward(o.avg_us, latency_us),
            _ => latency_us,
        };
        // The offer's age counts from its seq: the same seq again is no news of the
        // server, and must not keep a dead server's routes alive.
        let at = match prev {
            Some(o) if o.seq == seq => o.at,
            _ => now,
        };
        route.offers.insert(
            n.clone(),
            Offer {
                nb,
                through_us: path.iter().any(|x| same_id(x, &self.config.id)),
                path,
                latency_us,
                seq,
                at,
                catalogue,
                last_us,
                dev_us,
                avg_us,
            },
        );
        route.sync_offer_times();
        let from_parent = route.parent.as_deref() == Some(n.as_str());
        if from_parent && route.sent_seq.is_none_or(|s| seq > s) {
            self.reannounce(&server);
        }
    }

    /// When the parent of route `r` should next be asked for its announcement: one and a
    /// half announcement periods after its last new seq, then every half period after
    /// the last time it was asked (`None` without a parent's offer).
    fn refresh_due(&self, r: &Route) -> Option<Instant> {
        let at = r.parent_at()?;
        let period = self.config.announce_interval;
        let late = at + period + period / 2;
        Some(match r.refreshed {
            Some(t) if t >= late => t + period / 2,
            _ => late,
        })
    }

    /// Ask the parent of each route whose announcements stopped coming (see
    /// [`NodeConfig::announce_interval`]) for its announcement: a route request of one
    /// hop, answered at once and not passed on (the parent asks its own parent if it
    /// is late too).
    fn refresh_late_routes(&mut self, now: Instant) {
        let due: Vec<(String, String, u64)> = self
            .routes
            .iter()
            .filter(|(_, r)| self.refresh_due(r).is_some_and(|t| t <= now))
            .filter_map(|(s, r)| {
                let p = r.parent.clone()?;
                let seq = r.offers.get(&p)?.seq;
                Some((s.clone(), p, seq))
            })
            .collect();
        for (server, parent, seq) in due {
            self.stats.route_refreshes += 1;
            self.send_route_request(now, &server, seq.saturating_add(1), 1, Some(&parent));
            if let Some(r) = self.routes.get_mut(&server) {
                r.refreshed = Some(now);
            }
        }
    }

    /// Take one token of the route-request bucket, if there is one.
    fn rr_token(&mut self, now: Instant) -> bool {
        let rate = f64::from(self.config.route_requests_per_s);
        let dt = now.saturating_duration_since(self.rr_filled).as_secs_f64();
        self.rr_tokens = (self.rr_tokens + dt * rate).min(rate);
        self.rr_filled = now;
        if self.rr_tokens >= 1.0 {
            self.rr_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A neighbour lost its route to `server` and asks for an announcement of at least
    /// `seq` (Babel's seqno request).
    fn on_route_request(
        &mut self,
        now: Instant,
        from: SocketAddr,
        claimed: &str,
        server: &str,
        seq: u64,
        hops_left: u8,
    ) {
        let Some(n) = self.nb.id_of(from).map(str::to_owned) else {
            self.stats.unknown_sender += 1;
            return;
        };
        if n != claimed || !self.nb.is_alive(&n) {
            self.stats.unknown_sender += 1;
            return;
        }
        if !self.rr_token(now) {
            self.stats.route_requests_limited += 1;
            return;
        }
        // A request of one hop is a child's refresh (its announcements got lost), not a
        // lost route: no sign of a break upstream.
        if server != self.config.id && hops_left > 1 && self.suspect_quiet_parent(now, server) {
            self.stats.suspect_on_request += 1;
        }
        if server == self.config.id {
            if self.config.role != Role::Server {
                self.stats.ignored += 1;
                return;
            }
            // A fresh seq for everyone, at most one per 10 ms however many ask.
            self.stats.route_requests_answered += 1;
            let recent = self
                .last_triggered
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_millis(10));
            if !recent {
                self.last_triggered = Some(now);
                self.stats.triggered_announces += 1;
                self.next_announce = Some(now);
                self.announce_now(now);
            }
            return;
        }
        let Some(r) = self.routes.get(server) else {
            self.stats.ignored += 1;
            return;
        };
        let parent = r.parent.clone();
        let route_seq = parent.as_ref().and_then(|p| r.offers.get(p)).map(|o| o.seq);
        let (Some(parent), Some(route_seq)) = (parent, route_seq) else {
            self.stats.ignored += 1;
            return;
        };
        if parent == n {
            // Our parent asks: our route runs through its, which is lost or suspected
            // with no way round. Ours is no use to it, and just as broken.
            self.suspect_parent_asking(now, &n);
            return;
        }
        self.stats.route_requests_answered += 1;
        if let (Some(msg), Some(to)) = (self.announce_msg(server), self.nb.addr_of(&n)) {
            self.stats.announces_out += 1;
            self.stats.triggered_announces += 1;
            self.transmits.push_back(ControlTransmit { to, msg });
        }
        if route_seq < seq && hops_left > 1 {
            // Our route is too old to be feasible for it: ask upstream for a newer one,
            // once per seq and 100 ms.
            let dup = self
                .routes
                .get(server)
                .and_then(|r| r.requested)
                .is_some_and(|(t, s)| {
                    s >= seq && now.saturating_duration_since(t) < Duration::from_millis(100)
                });
            if !dup {
                self.send_route_request(now, server, seq, hops_left - 1, Some(&parent));
            }
        }
    }

    /// Send a route request for `server` to `only` (a neighbour), or to every alive
    /// neighbour.
    fn send_route_request(
        &mut self,
        now: Instant,
        server: &str,
        seq: u64,
        hops_left: u8,
        only: Option<&str>,
    ) {
        let msg = Message::RouteRequest {
            from: self.config.id.clone(),
            server: server.to_owned(),
            seq,
            hops_left,
        };
        let to: Vec<SocketAddr> = self
            .nb
            .iter()
            .filter(|i| i.alive && only.is_none_or(|o| o == i.id))
            .map(|i| i.addr)
            .collect();
        for addr in to {
            self.stats.route_requests_out += 1;
            self.transmits.push_back(ControlTransmit {
                to: addr,
                msg: msg.clone(),
            });
        }
        if let Some(r) = self.routes.get_mut(server) {
            r.requested = Some((now, seq));
        }
    }

    /// The data plane saw no media of `stream` from `parent` since `since` while the
    /// stream is live (about 100 ms of silence is a good threshold): the parent is
    /// suspected for [`NodeConfig::suspect_for`] and the node moves at once to a
    /// feasible alternative if it has one, or asks its neighbours for a route
    /// ([`Message::RouteRequest`]). A hint about another node than the stream's current
    /// parent, or about a silence that began before we joined there, is ignored.
    pub fn handle_upstream_silent(
        &mut self,
        now: Instant,
        parent: &str,
        stream: StreamId,
        since: Instant,
    ) {
        self.begin_input();
        if self.shut {
            return;
        }
        self.now = now;
        self.stats.upstream_silent_hints += 1;
        let relevant = self.streams.get(&stream).is_some_and(|st| {
            st.upstream.as_deref() == Some(parent) && st.joined_at.is_none_or(|j| since >= j)
        });
        if !relevant || self.suspects.contains_key(parent) {
            return;
        }
        // A parent we heard from within about a heartbeat interval is alive: the break
        // is further up, where the node below it repairs (every node below a dead one
        // seeing the silence at once and moving would scatter the tree onto paths that
        // go through the dead node too). The hint comes again while the silence lasts.
        let alive_within = self.config.liveness.heartbeat_interval + PARENT_HEARD_SLACK;
        if self
            .nb
            .last_heard(parent)
            .is_some_and(|t| now.saturating_duration_since(t) < alive_within)
        {
            self.stats.upstream_silent_parent_alive += 1;
            return;
        }
        tracing::info!(node = %self.config.id, parent, stream, "upstream silent, parent suspected");
        self.suspect_and_warn(now, parent);
    }

    /// Our parent asked us for a route (see [`NodeStats::suspect_parent_asking`]): it
    /// is suspected as on a silence hint, once while the suspicion lasts.
    fn suspect_parent_asking(&mut self, now: Instant, parent: &str) {
        if self.suspects.contains_key(parent) {
            self.stats.ignored += 1;
            return;
        }
        tracing::info!(node = %self.config.id, parent, "parent asked for a route, parent suspected");
        self.stats.suspect_parent_asking += 1;
        self.suspect_and_warn(now, parent);
    }

    /// Suspect `parent` for [`NodeConfig::suspect_for`]: move at once to a feasible
    /// way round where there is one, else ask around and warn the viewers.
    fn suspect_and_warn(&mut self, now: Instant, parent: &str) {
        self.stats.suspect_parents += 1;
        self.suspects
            .insert(parent.to_owned(), now + self.config.suspect_for);
        self.update(now);
        self.ask_around_suspect(now, parent);
        // No way round yet: the viewers of every stream still taken from the suspected
        // parent hear it now (a `Withdraw`, as when every path is lost; the hint came
        // for one stream, and a parent already suspected takes no more hints) and move
        // to another PoP at once instead of after their own media silence; should a
        // way round come first, their move costs nothing (make before break).
        // Not while a live neighbour offers a way that does not cross the suspect but
        // is not feasible yet: the route request just sent makes it feasible within a
        // round trip to the server, and viewers sent away now would move to other PoPs
        // that may be cut off by the same break (seed 8 of the loss-and-kill sweep:
        // two viewers swapped PoPs, one onto a dead end). Should it stay unfeasible,
        // the viewers hear it when the parent is declared dead and the route is lost.
        let stuck: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, st)| st.upstream.as_deref().is_some_and(|u| same_id(u, parent)))
            .map(|(id, _)| *id)
            .collect();
        for s in stuck {
            if self.way_round_coming(s, parent) {
                self.stats.warnings_held += 1;
            } else {
                self.warn_viewers(s);
            }
        }
    }

    /// Whether a live, unsuspected neighbour offers `stream`'s server over a path that
    /// does not cross `suspect` (feasible or not).
    fn way_round_coming(&self, stream: StreamId, suspect: &str) -> bool {
        let Some((server, _)) = self.source_route(stream) else {
            return false;
        };
        let Some(r) = self.routes.get(server) else {
            return false;
        };
        r.offers.iter().any(|(n, o)| {
            !same_id(n, suspect)
                && !self.suspects.contains_key(n)
                && self.nb.is_alive(n)
                && !o.path.iter().any(|x| same_id(x, suspect))
        })
    }

    /// Tell the viewers of `stream` that its path is lost (a `Withdraw` naming no
    /// server).
    fn warn_viewers(&mut self, stream: StreamId) {
        let Some(st) = self.streams.get(&stream) else {
            return;
        };
        let sent = withdraw_to_viewers(&st.children, &self.config.id, &mut self.transmits);
        self.stats.withdraws_out += sent;
        self.stats.viewers_warned += sent;
    }

    /// Every server whose route still runs through the suspected `parent` (no other
    /// feasible way yet): ask the neighbours for a route. A neighbour whose own route
    /// runs through the same silent node then suspects it too
    /// ([`Node::suspect_quiet_parent`]) and moves at once instead of at the dead-after
    /// time, and the request brings a fresh announcement that makes its new way
    /// feasible for us. At most once per [`Route::rr_retry`] per server.
    fn ask_around_suspect(&mut self, now: Instant, parent: &str) {
        let stuck: Vec<(String, u64)> = self
            .routes
            .iter()
            .filter(|(_, r)| r.parent.as_deref().is_some_and(|p| same_id(p, parent)))
            .filter(|(_, r)| {
                r.requested
                    .is_none_or(|(t, _)| now.saturating_duration_since(t) >= r.rr_retry())
            })
            .filter_map(|(server, r)| r.fd.map(|(seq, _)| (server.clone(), seq)))
            .collect();
        for (server, fd_seq) in stuck {
            self.stats.suspect_route_requests += 1;
            let hops = self.config.route_request_hops;
            self.send_route_request(now, &server, fd_seq.saturating_add(1), hops, None);
        }
    }

    /// A neighbour asked for a route to `server`: it lost its own. If ours runs through
    /// a parent we have not heard from for about a heartbeat interval, the same break is
    /// likely ours (a node that carries no stream gets no silence hint and would wait
    /// for the dead-after time): the parent is suspected as on a silence hint.
    /// Whether the parent was suspected.
    fn suspect_quiet_parent(&mut self, now: Instant, server: &str) -> bool {
        let Some(parent) = self.routes.get(server).and_then(|r| r.parent.clone()) else {
            return false;
        };
        if self.suspects.contains_key(&parent) {
            return false;
        }
        let alive_within = self.config.liveness.heartbeat_interval + PARENT_HEARD_SLACK;
        if self
            .nb
            .last_heard(&parent)
            .is_none_or(|t| now.saturating_duration_since(t) < alive_within)
        {
            return false;
        }
        tracing::info!(node = %self.config.id, parent = %parent, server, "parent quiet when asked for a route or a new stream, parent suspected");
        self.stats.suspect_parents += 1;
        self.suspects
            .insert(parent.clone(), now + self.config.suspect_for);
        self.update(now);
        self.ask_around_suspect(now, &parent);
        true
    }

    fn on_join(
        &mut self,
        now: Instant,
        from: SocketAddr,
        stream: StreamId,
        data_port: u16,
        node: Option<NodeId>,
    ) {
        self.stats.joins_in += 1;
        let child_node = match node {
            Some(claimed) => match self.nb.id_of(from) {
                Some(id) if id == claimed => Some(claimed),
                _ => {
                    self.stats.unknown_sender += 1;
                    return;
                }
            },
            None => {
                // A viewer's first Join: only a PoP answers, with a cookie sent to the
                // address the media would go to. Nothing is subscribed until it comes
                // back in a `ViewerJoin`.
                if self.config.role != Role::Pop {
                    self.stats.viewer_not_pop += 1;
                    return;
                }
                if !self.refuse_unknown_stream(from, stream) {
                    self.send_cookie(now, SocketAddr::new(from.ip(), data_port), stream);
                }
                return;
            }
        };
        let known = self.catalogue().iter().any(|s| s.id == stream);
        if !known {
            self.stats.ignored += 1;
            if child_node.is_none() {
                self.stats.errors_out += 1;
                self.transmits.push_back(ControlTransmit {
                    to: from,
                    msg: Message::Error {
                        reason: format!("unknown stream {stream:#010x}"),
                    },
                });
            }
            return;
        }
        let key = SocketAddr::new(from.ip(), data_port);
        let expires = now + self.config.join_expiry;
        let fresh = self.not_carried(stream);
        let children = &mut self.streams.entry(stream).or_default().children;
        // A refresh keeps what the child asked to avoid.
        let (avoid, avoid_until) = children
            .get(&key)
            .filter(|c| c.node == child_node)
            .map(|c| (c.avoid.clone(), c.avoid_until))
            .unwrap_or_default();
        children.insert(
            key,
            Child {
                node: child_node,
                expires,
                ctrl_port: from.port(),
                session: None,
                avoid,
                avoid_until,
            },
        );
        if fresh {
            self.suspect_quiet_parent_of(now, stream);
        }
    }

    /// A child's [`Message::Avoid`]: only for an existing subscription at the sender's
    /// IP address and `data_port` (a node's from its own address; a viewer's once
    /// admitted).
    fn on_avoid(
        &mut self,
        now: Instant,
        from: SocketAddr,
        stream: StreamId,
        data_port: u16,
        mut avoid: Vec<NodeId>,
    ) {
        self.stats.avoids_in += 1;
        let key = SocketAddr::new(from.ip(), data_port);
        let sender = self.nb.id_of(from).map(str::to_owned);
        let Some(c) = self
            .streams
            .get_mut(&stream)
            .and_then(|st| st.children.get_mut(&key))
        else {
            self.stats.ignored += 1;
            return;
        };
        if c.node.is_some() && c.node != sender {
            self.stats.ignored += 1;
            return;
        }
        avoid.sort();
        avoid.dedup();
        avoid.truncate(ott_proto::MAX_AVOID);
        c.avoid = avoid;
        c.avoid_until = Some(now + self.config.join_expiry);
    }

    /// Answer an unknown stream with an error (to the sender); `true` if it was unknown.
    fn refuse_unknown_stream(&mut self, from: SocketAddr, stream: StreamId) -> bool {
        if self.catalogue().iter().any(|s| s.id == stream) {
            return false;
        }
        self.stats.ignored += 1;
        self.stats.errors_out += 1;
        self.transmits.push_back(ControlTransmit {
            to: from,
            msg: Message::Error {
                reason: format!("unknown stream {stream:#010x}"),
            },
        });
        true
    }

    /// The cookie bucket `now` falls in.
    fn bucket(&self, now: Instant) -> u64 {
        let len = micros(self.config.cookie_bucket).max(1);
        micros(now.saturating_duration_since(self.started)) / len
    }

    /// How many buckets old `cookie` is for the viewer at `data` (0 or 1), or `None`
    /// if it is not a cookie this node made for that address in the last two buckets.
    fn cookie_age(&self, now: Instant, data: SocketAddr, cookie: u64) -> Option<u64> {
        let b = self.bucket(now);
        let secret = &self.config.admission_secret;
        (0..=1u64).find(|age| {
            b.checked_sub(*age)
                .is_some_and(|bb| viewer_cookie(secret, data, bb) == cookie)
        })
    }

    fn send_cookie(&mut self, now: Instant, data: SocketAddr, stream: StreamId) {
        self.stats.cookies_out += 1;
        let cookie = viewer_cookie(&self.config.admission_secret, data, self.bucket(now));
        self.transmits.push_back(ControlTransmit {
            to: data,
            msg: Message::Cookie {
                stream,
                data_port: data.port(),
                cookie,
            },
        });
    }

    /// A viewer's `Join` with the cookie echoed: subscribe it (within the caps) and
    /// send it its session key.
    fn on_viewer_join(
        &mut self,
        now: Instant,
        from: SocketAddr,
        stream: StreamId,
        data_port: u16,
        cookie: u64,
    ) {
        self.stats.joins_in += 1;
        if self.config.role != Role::Pop {
            self.stats.viewer_not_pop += 1;
            return;
        }
        let data = SocketAddr::new(from.ip(), data_port);
        let Some(age) = self.cookie_age(now, data, cookie) else {
            // Forged, or expired: the owner of the address gets a fresh cookie.
            self.stats.bad_cookie += 1;
            if !self.refuse_unknown_stream(from, stream) {
                self.send_cookie(now, data, stream);
            }
            return;
        };
        if self.refuse_unknown_stream(from, stream) {
            return;
        }
        let existing = self
            .streams
            .get(&stream)
            .and_then(|s| s.children.get(&data))
            .is_some_and(|c| c.node.is_none());
        if !existing {
            let of_stream = self.streams.get(&stream).map_or(0, |s| {
                s.children.values().filter(|c| c.node.is_none()).count()
            });
            if of_stream >= self.config.max_viewers_per_stream {
                self.stats.viewer_cap_stream += 1;
                self.refuse_viewer(from, "too many viewers of this stream at this PoP");
                return;
            }
            let of_ip = self
                .streams
                .values()
                .flat_map(|s| s.children.iter())
                .filter(|(a, c)| c.node.is_none() && a.ip() == data.ip())
                .count();
            if of_ip >= self.config.max_viewers_per_ip {
                self.stats.viewer_cap_ip += 1;
                self.refuse_viewer(from, "too many subscriptions from this address");
                return;
            }
        }
        self.stats.viewer_joins += 1;
        let session = SessionKey::derive(&self.config.admission_secret, data);
        let session_key = session.bytes();
        let expires = now + self.config.join_expiry;
        let fresh = self.not_carried(stream);
        let st = self.streams.entry(stream).or_default();
        match st.children.get_mut(&data) {
            Some(c) if c.node.is_some() => {
                // An overlay member's subscription is not a viewer's to take over.
                self.stats.ignored += 1;
                return;
            }
            Some(c) => {
                c.expires = expires;
                c.ctrl_port = from.port();
            }
            None => {
                st.children.insert(
                    data,
                    Child {
                        node: None,
                        expires,
                        ctrl_port: from.port(),
                        session: Some(session),
                        avoid: Vec::new(),
                        avoid_until: None,
                    },
                );
            }
        }
        self.transmits.push_back(ControlTransmit {
            to: data,
            msg: Message::Admitted {
                stream,
                data_port,
                session_key,
            },
        });
        if age > 0 {
            self.send_cookie(now, data, stream);
        }
        if fresh {
            self.suspect_quiet_parent_of(now, stream);
        }
    }

    /// Whether `stream` has no upstream yet (a first child subscribes it).
    fn not_carried(&self, stream: StreamId) -> bool {
        self.streams
            .get(&stream)
            .is_none_or(|st| st.upstream.is_none())
    }

    /// A first child subscribed `stream`, which must now come through our parent for its
    /// server. A viewer moves here when its PoP lost its path, and our path may run
    /// through the same dead node: if the parent has been quiet for over a heartbeat
    /// interval, it is suspected as on a route request, instead of the viewer waiting
    /// for the dead-after time (a node that carried no stream had no silence hint).
    fn suspect_quiet_parent_of(&mut self, now: Instant, stream: StreamId) {
        if self.own_catalogue.iter().any(|s| s.id == stream) {
            return;
        }
        if let Some(server) = self.source_route(stream).map(|(s, _)| s.to_owned()) {
            if self.suspect_quiet_parent(now, &server) {
                self.stats.suspect_on_join += 1;
            }
        }
    }

    fn refuse_viewer(&mut self, to: SocketAddr, reason: &str) {
        self.stats.errors_out += 1;
        self.transmits.push_back(ControlTransmit {
            to,
            msg: Message::Error {
                reason: reason.to_owned(),
            },
        });
    }

    /// Drive timers: heartbeats, announcements, join refreshes, expiry of children and
    /// offers. Call it when [`Node::poll_timeout`] is reached (earlier is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        let quiet = self.begin_input();
        if self.shut {
            return;
        }
        self.now = now;
        self.nb.handle_timeout(now);
        let events = self.pump_neighbours(now);
        if self.next_announce.is_some_and(|t| now >= t) {
            self.announce_now(now);
        } else if !events && self.skip_update(now, quiet) {
            // Only heartbeats were due (the neighbour table's timer): sending them
            // changes nothing the update reads.
            return;
        }
        self.update_last(now);
    }

    /// Servers: announce ourselves to every neighbour now, with a fresh seq, and
    /// schedule the next announcement a period later.
    fn announce_now(&mut self, now: Instant) {
        {
            {
                // The server's clock in µs: it grows across restarts and as fast as
                // time, which lets receivers bound how far a seq may jump.
                let clock = self
                    .config
                    .incarnation
                    .saturating_add(micros(now.saturating_duration_since(self.started)));
                self.own_seq = clock.max(self.own_seq.saturating_add(1));
                let msg = Message::Announce {
                    server: self.config.id.clone(),
                    seq: self.own_seq,
                    path: vec![self.config.id.clone()],
                    latency_us: 0,
                    catalogue: self.own_catalogue.clone(),
                };
                for info in self.nb.iter() {
                    self.stats.announces_out += 1;
                    self.transmits.push_back(ControlTransmit {
                        to: info.addr,
                        msg: msg.clone(),
                    });
                }
                self.next_announce = Some(now + self.config.announce_interval);
            }
        }
    }

    /// Leave upstream for every stream and say `Bye` to every neighbour. The node is inert
    /// afterwards.
    pub fn shutdown(&mut self, _now: Instant) {
        self.begin_input();
        if self.shut {
            return;
        }
        for (stream, st) in &mut self.streams {
            if let Some(up) = st.upstream.take() {
                self.pointer_version += 1;
                if let Some(addr) = self.nb.addr_of(&up) {
                    self.stats.leaves_out += 1;
                    self.transmits.push_back(ControlTransmit {
                        to: addr,
                        msg: Message::Leave {
                            stream: *stream,
                            data_port: self.config.data_port,
                        },
                    });
                }
            }
        }
        self.nb.shutdown();
        self.pump_neighbours(_now);
        self.shut = true;
    }

    /// The next control message to send. Changed by every `handle*`, command and `new`.
    pub fn poll_transmit(&mut self) -> Option<ControlTransmit> {
        ott_overlay::hint::pop_front_reset(&mut self.transmits)
    }

    /// The next event. Changed by every `handle*` and command.
    pub fn poll_event(&mut self) -> Option<Event> {
        ott_overlay::hint::pop_front_reset(&mut self.events)
    }

    /// When [`Node::handle_timeout`] must next be called. Changed by every `handle*` and
    /// command; `None` after `shutdown`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.shut {
            return None;
        }
        let own = if self.quiet_until.is_some() {
            debug_assert_eq!(
                self.own_timeout,
                self.own_timeout(),
                "Node::own_timeout stale"
            );
            self.own_timeout
        } else {
            self.own_timeout()
        };
        [self.nb.poll_timeout(), own].into_iter().flatten().min()
    }

    /// [`Node::poll_timeout`] but the neighbour table's.
    fn own_timeout(&self) -> Option<Instant> {
        self.deadlines(self.now).0
    }

    /// Prefetch the node's own fields that every input reads (the neighbour table's
    /// handles, the routes', the queues'), for a caller that knows this node is next
    /// ([`ott_overlay::hint::prefetch`]).
    #[inline]
    pub fn prefetch_self(&self) {
        use ott_overlay::hint::{prefetch, prefetch_all};
        prefetch_all(&self.nb);
        prefetch(&self.routes);
        prefetch(&self.transmits);
        prefetch(&self.suspects);
        prefetch(&self.now);
        // The input's count and quiet window, and the node's timer.
        prefetch(&self.inputs);
        prefetch_all(&self.quiet_until);
        prefetch_all(&self.own_timeout);
    }

    /// How many inputs so far may have changed the node's routes, parents,
    /// subscriptions or invariants: every input but those that skipped the update
    /// (see `Node::skip_update`: a heartbeat from a neighbour already alive, an ack
    /// that leaves the parent choice as it is, a timer that only sent heartbeats,
    /// each before any time condition flipped). While this stays the same, so does whether
    /// [`Node::check_invariants`] holds.
    pub fn changing_inputs(&self) -> u64 {
        self.inputs - self.updates_skipped
    }

    /// Prefetch what an input reads behind the node's own fields: the neighbour
    /// table's ([`Neighbours::prefetch`]) and the places the next transmit and event
    /// will be queued. Best called a little after [`Node::prefetch_self`], once the
    /// node's fields are in.
    #[inline]
    pub fn prefetch_inner(&self) {
        self.nb.prefetch();
        ott_overlay::hint::prefetch_front(&self.transmits);
        ott_overlay::hint::prefetch_front(&self.events);
        // The first route (a node of a single server has no other), whose offers
        // `handle` prefetches in turn.
        if let Some((_, r)) = self.routes.first() {
            ott_overlay::hint::prefetch_all(r);
        }
    }

    /// Prefetch the first route's offers (what the parent choice weighs), once the
    /// route is in: from there to the update, the input's own work hides the wait.
    #[inline]
    fn prefetch_offers(&self) {
        // Not the server's or the parent's id: the parent choice reads them only when
        // the parent changes (it finds the parent by position, `Route::parent_pos`).
        if let Some((_, r)) = self.routes.first() {
            for o in r.offers.as_slice() {
                ott_overlay::hint::prefetch_all(o);
            }
        }
    }

    /// Counters.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// Every stream reachable: our own, then those announced by the servers we have a
    /// route to, each name once (first found wins), sorted by name.
    pub fn catalogue(&self) -> Vec<StreamInfo> {
        let mut out: BTreeMap<String, StreamInfo> = BTreeMap::new();
        for s in &self.own_catalogue {
            out.entry(s.name.clone()).or_insert_with(|| s.clone());
        }
        for r in self.routes.values() {
            if let Some(o) = r.parent.as_ref().and_then(|p| r.offers.get(p)) {
                for s in &o.catalogue {
                    out.entry(s.name.clone()).or_insert_with(|| s.clone());
                }
            }
        }
        out.into_values().collect()
    }

    /// The current parent towards `server`.
    pub fn parent(&self, server: &str) -> Option<&str> {
        self.routes.get(server).and_then(|r| r.parent.as_deref())
    }

    /// Servers we know of (have or had offers for), sorted.
    pub fn servers(&self) -> Vec<String> {
        self.routes.keys().cloned().collect()
    }

    /// Every server we have a parent towards, with that parent, sorted by server (what
    /// [`Node::servers`] and [`Node::parent`] give, without copying).
    pub fn parents(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.routes
            .iter()
            .filter_map(|(s, r)| Some((s.as_str(), r.parent.as_deref()?)))
    }

    /// Every stream joined upstream, with its upstream, sorted by stream id (what
    /// [`Node::stream_ids`] and [`Node::upstream`] give, without copying).
    pub fn upstreams(&self) -> impl Iterator<Item = (StreamId, &str)> + '_ {
        self.streams
            .iter()
            .filter_map(|(id, st)| Some((*id, st.upstream.as_deref()?)))
    }

    /// A counter that changes whenever [`Node::parents`] or [`Node::upstreams`] may
    /// have changed: a caller that saw the same value of the same node before sees the
    /// same pointers (a loop check can skip a node whose pointers it already checked).
    pub fn pointer_version(&self) -> u64 {
        self.pointer_version
    }

    /// The parent `stream` is joined at, if any.
    pub fn upstream(&self, stream: StreamId) -> Option<&str> {
        self.streams
            .get(&stream)
            .and_then(|s| s.upstream.as_deref())
    }

    /// Ids of the streams this node holds state for (joined upstream or with children).
    pub fn stream_ids(&self) -> Vec<StreamId> {
        self.streams.keys().copied().collect()
    }

    /// The data addresses `stream` is currently forwarded to.
    pub fn forwarding(&self, stream: StreamId) -> Vec<SocketAddr> {
        self.streams
            .get(&stream)
            .map(|s| s.children.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Effective latency (µs) and hops of `n`'s offer, if usable as a parent.
    fn eligible(&self, n: &str, o: &Offer) -> Option<(u64, u32)> {
        // No stored offer has a path through us: `on_announce` drops those (and the
        // neighbour's older offer with them), so the path need not be searched here.
        debug_assert!(!o.through_us);
        let rtt = self.nb.rtt_if_alive(n)?;
        Some(Self::metric(o, rtt))
    }

    /// Where a route of effective latency `lat` stands: the slow mean of its offers,
    /// plus the link's half RTT of the moment.
    fn level(o: Option<&Offer>, lat: u64) -> u64 {
        o.map_or(lat, |o| {
            lat.saturating_sub(o.latency_us).saturating_add(o.avg_us)
        })
    }

    /// The (effective latency µs, hops) of offer `o` over a link of `rtt`: the
    /// neighbour's latency plus half the RTT.
    fn metric(o: &Offer, rtt: Duration) -> Metric {
        let hops = u32::try_from(o.path.len()).unwrap_or(u32::MAX);
        (o.latency_us.saturating_add(micros(rtt) / 2), hops)
    }

    /// Whether `o` may become (or stay) our parent's offer without any risk of a loop:
    /// Babel's feasibility condition (RFC 8966 §3.5.1) with hop count as the metric. An
    /// offer is feasible when its seq is newer than our feasibility distance's, or the
    /// same and the neighbour is strictly closer to the server (in hops) than we ever
    /// were at that seq. Along any chain of parents the (seq, hops) pairs then strictly
    /// decrease, so no chain can close on itself, even while some nodes still act on
    /// stale announcements. Latency still chooses among the feasible offers.
    fn feasible(fd: Option<(u64, u32)>, o: &Offer) -> bool {
        let Some((seq, hops)) = fd else {
            return true;
        };
        let theirs = u32::try_from(o.path.len().saturating_sub(1)).unwrap_or(u32::MAX);
        o.seq > seq || (o.seq == seq && theirs < hops)
    }

    /// Latency (µs) and hops of our route to `server`.
    fn route_metric(&self, server: &str) -> Option<(u64, u32)> {
        let r = self.routes.get(server)?;
        let p = r.parent.as_ref()?;
        self.eligible(p, r.offers.get(p)?)
    }

    /// The best server for a stream: ourselves if we originate it, else the reachable
    /// server offering it with the lowest (latency, hops, id).
    fn source_of(&self, stream: StreamId) -> Option<Option<String>> {
        if self.own_catalogue.iter().any(|s| s.id == stream) {
            return Some(None);
        }
        self.source_route(stream).map(|(_, p)| Some(p.to_owned()))
    }

    /// The server and parent of the best route to a server offering `stream`.
    fn source_route(&self, stream: StreamId) -> Option<(&str, &str)> {
        self.routes
            .iter()
            .filter_map(|(server, r)| {
                let p = r.parent.as_ref()?;
                let o = r.offers.get(p)?;
                if !o.catalogue.iter().any(|s| s.id == stream) {
                    return None;
                }
                let (lat, hops) = self.eligible(p, o)?;
                Some(((lat, hops, server.as_str()), p.as_str()))
            })
            .min()
            .map(|((_, _, server), p)| (server, p))
    }

    /// (latency µs, hops) of the best route to any server; (0, 0) on a server.
    fn best_route_metric(&self) -> (Option<u64>, Option<u32>) {
        if self.config.role == Role::Server {
            return (Some(0), Some(0));
        }
        self.routes
            .keys()
            .filter_map(|s| self.route_metric(s))
            .min()
            .map_or((None, None), |(l, h)| (Some(l), Some(h)))
    }

    /// The path a stream we take from upstream `up` comes over: the announced path of
    /// `up`'s offer carrying it, then us.
    fn stream_path(&self, stream: StreamId, up: &str) -> Option<Vec<NodeId>> {
        let o = self
            .routes
            .values()
            .filter_map(|r| r.offers.get(up))
            .filter(|o| o.catalogue.iter().any(|s| s.id == stream))
            .min_by_key(|o| (o.latency_us, o.path.len()))?;
        let mut path = o.path.clone();
        path.push(self.config.id.clone());
        Some(path)
    }

    /// The path to put in a `ProbeReply` to `from`: the path of the stream a viewer at
    /// `from`'s IP address receives from us, else the path from the best server to this
    /// node, inclusive; empty without a route or when its ids exceed
    /// [`ott_proto::MAX_PROBE_PATH_BYTES`].
    fn probe_path(&self, from: SocketAddr) -> Vec<NodeId> {
        let watched = self.streams.iter().find_map(|(id, st)| {
            let viewer_here = st
                .children
                .iter()
                .any(|(a, c)| c.node.is_none() && a.ip() == from.ip());
            let up = st.upstream.as_deref().filter(|_| viewer_here)?;
            self.stream_path(*id, up)
        });
        let path = if self.config.role == Role::Server {
            vec![self.config.id.clone()]
        } else if let Some(p) = watched {
            p
        } else {
            self.best_server()
                .map(|s| self.route_status(&s).path)
                .unwrap_or_default()
        };
        let bytes: usize = path.iter().map(|id| id.len() + 1).sum();
        if bytes > ott_proto::MAX_PROBE_PATH_BYTES {
            Vec::new()
        } else {
            path
        }
    }

    fn best_server(&self) -> Option<String> {
        self.routes
            .keys()
            .filter_map(|s| self.route_metric(s).map(|m| (m, s.clone())))
            .min()
            .map(|(_, s)| s)
    }

    fn viewers(&self) -> u32 {
        let clients: BTreeSet<SocketAddr> = self
            .streams
            .values()
            .flat_map(|s| s.children.iter())
            .filter(|(_, c)| c.node.is_none())
            .map(|(a, _)| *a)
            .collect();
        u32::try_from(clients.len()).unwrap_or(u32::MAX)
    }

    /// Take the neighbour table's transmits and events; whether there was an event.
    fn pump_neighbours(&mut self, _now: Instant) -> bool {
        while let Some(t) = self.nb.poll_transmit() {
            self.transmits.push_back(t);
        }
        let mut any = false;
        while let Some(ev) = self.nb.poll_event() {
            any = true;
            match ev {
                NeighbourEvent::Up(id) => {
                    self.greet(&id);
                    self.events.push_back(Event::NeighbourUp(id));
                }
                NeighbourEvent::Down(id) => {
                    self.forget(&id);
                    self.events.push_back(Event::NeighbourDown(id));
                }
                NeighbourEvent::Restarted(id) => self.forget(&id),
            }
        }
        any
    }

    /// Drop every offer and child of neighbour `id`, and every other neighbour's offer
    /// whose path runs through `id`: those neighbours will lose that path too, and until
    /// they say so their offers are stale. Taking one of them could close a loop with a
    /// node of the dead neighbour's subtree doing the same at the same moment.
    fn forget(&mut self, id: &str) {
        for (_, r) in self.routes.iter_mut() {
            r.offers.remove(id);
            r.offers.retain(|_, o| !o.path.iter().any(|x| x == id));
            r.sync_offer_times();
        }
        for s in self.streams.values_mut() {
            s.children.retain(|_, c| c.node.as_deref() != Some(id));
        }
    }

    /// A neighbour came up: tell it our routes at once instead of at the next period.
    fn greet(&mut self, id: &str) {
        let Some(addr) = self.nb.addr_of(id) else {
            return;
        };
        let servers: Vec<String> = self
            .routes
            .iter()
            .filter(|(_, r)| r.parent.as_deref().is_some_and(|p| p != id))
            .map(|(s, _)| s.clone())
            .collect();
        for s in servers {
            if let Some(msg) = self.announce_msg(&s) {
                self.stats.announces_out += 1;
                self.transmits.push_back(ControlTransmit { to: addr, msg });
            }
        }
    }

    fn announce_msg(&self, server: &str) -> Option<Message> {
        let r = self.routes.get(server)?;
        let p = r.parent.as_ref()?;
        let o = r.offers.get(p)?;
        let (lat, _) = self.eligible(p, o)?;
        let mut path = o.path.clone();
        path.push(self.config.id.clone());
        Some(Message::Announce {
            server: server.to_owned(),
            seq: o.seq,
            path,
            latency_us: lat,
            catalogue: o.catalogue.clone(),
        })
    }

    /// Pass our route to `server` on to every neighbour but the parent, and tell the
    /// parent we have no route for it (so it never picks us: poison reverse).
    fn reannounce(&mut self, server: &str) {
        let Some(msg) = self.announce_msg(server) else {
            return;
        };
        let Some(route) = self.routes.get(server) else {
            return;
        };
        let parent = route.parent.clone();
        let Message::Announce { seq, ref path, .. } = msg else {
            return;
        };
        // What we advertise bounds what we may take later: record it in the feasibility
        // distance, or a node could advertise a newer seq and then fall back to an older
        // one through a child that took the newer advertisement (a loop).
        let hops = u32::try_from(path.len().saturating_sub(1)).unwrap_or(u32::MAX);
        if let Some(r) = self.routes.get_mut(server) {
            let fd = Some(advance_fd(r.fd, seq, hops));
            self.fd_moved |= r.fd != fd;
            r.fd = fd;
        }
        for info in self.nb.iter() {
            if Some(&info.id) == parent.as_ref() {
                self.stats.withdraws_out += 1;
                self.transmits.push_back(ControlTransmit {
                    to: info.addr,
                    msg: withdraw(&self.config.id, server, seq),
                });
            } else {
                self.stats.announces_out += 1;
                self.transmits.push_back(ControlTransmit {
                    to: info.addr,
                    msg: msg.clone(),
                });
            }
        }
        if let Some(r) = self.routes.get_mut(server) {
            r.sent_seq = Some(seq);
            r.withdrawn = false;
        }
    }

    /// Re-evaluate everything after an input: expiry, parents, subscriptions.
    fn update(&mut self, now: Instant) {
        self.suspects.retain(|_, until| *until > now);
        let expiry = self.config.route_expiry;
        let fresh_at = |at: Instant| now.saturating_duration_since(at) < expiry;
        let fresh = |o: &Offer| fresh_at(o.at);
        for (_, r) in self.routes.iter_mut() {
            // Offers rarely expire: all are fresh when the oldest is (freshness only
            // falls with age).
            if !r.oldest_at().is_none_or(fresh_at) {
                r.offers.retain(|_, o| fresh(o));
                r.sync_offer_times();
            }
        }
        self.refresh_late_routes(now);
        // By position, in the order of the servers' ids: choosing parents adds or
        // removes no route, and the server's id is read only when the parent changes.
        for at in 0..self.routes.len() {
            self.select_parent(at);
        }
        self.reconcile_streams(now);
    }

    /// Every input starts here: it is counted, and it ends the quiet window (only an
    /// input that changes nothing the update reads reopens it, see
    /// [`Node::skip_update`]); the window as it was.
    fn begin_input(&mut self) -> Option<Instant> {
        self.inputs += 1;
        self.quiet_until.take()
    }

    /// Skip the update of an input that changed nothing it reads if no time condition
    /// of it flipped since the last one (`now` before `quiet`, the window
    /// [`Node::begin_input`] took): the window is kept, and the skip counted (and in
    /// debug builds every 16th checked against a full update on a copy). Whether it
    /// was skipped.
    fn skip_update(&mut self, now: Instant, quiet: Option<Instant>) -> bool {
        if quiet.is_none_or(|q| now >= q) {
            return false;
        }
        self.quiet_until = quiet;
        self.updates_skipped += 1;
        #[cfg(debug_assertions)]
        if self.updates_skipped % 16 == 1 {
            self.check_skip(now);
        }
        true
    }

    /// [`Node::update`] as the last thing an input does: until [`Node::deadlines`]
    /// another update would do nothing new unless something changes.
    fn update_last(&mut self, now: Instant) {
        self.fd_moved = false;
        self.update(now);
        // The timer is kept as long as `quiet_until` is: the heartbeats that skip the
        // update leave it as it is too.
        let quiet;
        (self.own_timeout, quiet) = self.deadlines(now);
        // A feasibility distance moved by this update may rule out an offer it still
        // weighed (the parent's new announcement made the others' older ones
        // unfeasible): the next update would not be the same, so none is skipped.
        self.quiet_until = quiet.filter(|_| !self.fd_moved);
    }

    /// The node's deadlines, in one walk over its suspects, routes and streams: the
    /// earliest of its own timers ([`Node::own_timeout`]: the next announcement, a
    /// route request to repeat, a suspicion, an offer or a child expiring, a late
    /// announcement or a join to refresh), and the earliest instant after `now` at
    /// which one of the time conditions [`Node::update`] reads flips (those, and the
    /// parent hold, `better_for` or the flap window ending, a route request given up,
    /// an avoid set expiring): until then an update with nothing else changed does
    /// nothing ([`Node::quiet_until`]).
    fn deadlines(&self, now: Instant) -> (Option<Instant>, Option<Instant>) {
        let (mut timer, mut change): (Option<Instant>, Option<Instant>) = (None, None);
        let earliest = |x: &mut Option<Instant>, t: Instant| {
            *x = Some(x.map_or(t, |y| y.min(t)));
        };
        // Both a timer and a condition of the update.
        let both = |t: Instant, timer: &mut Option<Instant>, change: &mut Option<Instant>| {
            earliest(timer, t);
            if t > now {
                earliest(change, t);
            }
        };
        if let Some(a) = self.next_announce {
            earliest(&mut timer, a);
        }
        for t in self.suspects.values() {
            both(*t, &mut timer, &mut change);
        }
        let c = &self.config;
        for r in self.routes.values() {
            // The oldest offer expires first.
            if let Some(t) = r.oldest_at() {
                both(t + c.route_expiry, &mut timer, &mut change);
            }
            if let Some(t) = self.refresh_due(r) {
                both(t, &mut timer, &mut change);
            }
            // The update's conditions only (acted on at the next input, not by a timer).
            let mut condition = |t: Instant| {
                if t > now {
                    earliest(&mut change, t);
                }
            };
            if let Some(t) = r.changed_at {
                condition(t + c.parent_hold);
            }
            if let Some((_, t)) = &r.better {
                condition(*t + c.better_for);
            }
            if let Some((_, t, _)) = &r.left {
                condition(*t + c.flap_window);
            }
            if let Some(t) = r.lost_at {
                // Given up strictly after: the instant after is flipped too.
                condition(t + RR_GIVE_UP + Duration::from_nanos(1));
            }
            if let Some((t, _)) = r.requested {
                let retry = t + r.rr_retry();
                condition(retry);
                // Repeated by the timer while the route is lost and not given up.
                if r.lost_at.is_some_and(|lost| retry <= lost + RR_GIVE_UP) {
                    earliest(&mut timer, retry);
                }
            }
        }
        for st in self.streams.values() {
            if let Some(t) = st.next_refresh {
                both(t, &mut timer, &mut change);
            }
            for ch in st.children.values() {
                both(ch.expires, &mut timer, &mut change);
                if let Some(t) = ch.avoid_until {
                    if t > now {
                        earliest(&mut change, t);
                    }
                }
            }
        }
        (timer, change)
    }

    /// Debug builds: a skipped update ([`Node::quiet_until`]) would have changed
    /// nothing; panics if a full update on a copy does.
    #[cfg(debug_assertions)]
    fn check_skip(&self, now: Instant) {
        let mut copy = self.clone();
        copy.update(now);
        let (a, b) = (format!("{self:?}"), format!("{copy:?}"));
        if a != b {
            let at = a
                .bytes()
                .zip(b.bytes())
                .position(|(x, y)| x != y)
                .unwrap_or(a.len().min(b.len()));
            let from = at.saturating_sub(300);
            panic!(
                "{}: a skipped update would have changed the node:\n skipped: …{}\n updated: …{}",
                self.config.id,
                a.get(from..(at + 200).min(a.len())).unwrap_or_default(),
                b.get(from..(at + 200).min(b.len())).unwrap_or_default(),
            );
        }
    }

    /// Weigh the offers of the route at position `at` for the parent as
    /// [`Node::select_parent`] does, without changing the route; `None` without a
    /// route there, or when the choice would draw from the random stream (equal
    /// offers, no parent among them) and `draw` is off.
    fn choose_parent(&mut self, at: usize, draw: bool) -> Option<Choice> {
        let now = self.now;
        let (_, r) = self.routes.get_indexed(at)?;
        let fd = r.fd;
        // The id of the offer at position `k` (read only where ids must be compared or
        // kept: each is one more cache miss at 10,000 nodes).
        let id = |k: usize| r.offers.get_indexed(k).map_or("", |(n, _)| n.as_str());
        // (effective latency, hops), spreads (route, link), position of every feasible
        // offer (on the stack for up to 8 offers: this runs after every input).
        let mut cands: smallvec::SmallVec<[(Metric, Spreads, usize); 8]> = r
            .offers
            .iter()
            .enumerate()
            .filter(|(_, (_, o))| Self::feasible(fd, o))
            .filter_map(|(k, (n, o))| {
                debug_assert_eq!(o.nb, self.nb.index_of(n), "offer's neighbour index");
                let (rtt, spread) = self.nb.rtt_and_spread_if_alive_at(o.nb?)?;
                debug_assert!(!o.through_us);
                Some((Self::metric(o, rtt), (o.dev_us, micros(spread) / 2), k))
            })
            .collect();
        // A suspected neighbour is no parent while there is another way.
        if !self.suspects.is_empty()
            && cands
                .iter()
                .any(|(_, _, k)| !self.suspects.contains_key(id(*k)))
        {
            cands.retain(|(_, _, k)| !self.suspects.contains_key(id(*k)));
        }
        // Equal metrics are broken at random (seeded), then by id.
        cands.sort_unstable_by(|a, b| {
            (a.0, a.1)
                .cmp(&(b.0, b.1))
                .then_with(|| id(a.2).cmp(id(b.2)))
        });
        let best = cands.first().copied();
        // The parent's offer, by position ([`Route::parent_pos`]).
        let parent_pos = r.parent_pos();
        let current = parent_pos.and_then(|p| cands.iter().find(|c| c.2 == p).copied());
        let held = r
            .changed_at
            .is_some_and(|t| now.saturating_duration_since(t) < self.config.parent_hold);
        let mut better: Option<(usize, Instant)> = None;
        // For the log: (current latency, best latency, margin, clear margin), µs.
        let mut weighed: Option<(u64, u64, u64, u64)> = None;
        // A move for a gain under twice the margin (it had to last `better_for`).
        let mut marginal: Option<u64> = None;
        let new: Option<usize> = match (current, best) {
            (Some(cur), Some(best)) => {
                let cur_lat = cur.0 .0;
                // The smaller of the two spreads, of the routes (measured from their
                // announcements) or of the links (from the heartbeats, whichever is
                // wider): a real change of the parent's path shows as spread too, and
                // must not hold the parent in place.
                let k = self.config.hysteresis_spread;
                let ((cur_dev, cur_link), (best_dev, best_link)) = (cur.1, best.1);
                let spread = cur_dev.min(best_dev).max(cur_link.min(best_link));
                let mut margin = micros(self.config.hysteresis_abs)
                    .max((cur_lat as f64 * self.config.hysteresis_rel) as u64)
                    .max((spread as f64 * k) as u64);
                // Going back to the parent we just left for a marginal gain is a flap
                // unless the gain is twice the margin; not when our route got worse
                // since (by more than the margin): that is a real change. "Since" is
                // from where the route stood when we took it (see `marginal`), not
                // from its latency then: the move was made at a low of the jitter, and
                // the route drifts back up from there. "Worse" is the route's level
                // now against that, since a high of the jitter is no change: the slow
                // mean of its offers (a change upstream shows there within seconds)
                // plus the link's half RTT of the moment (a change of the link shows
                // at once); or its latency of the moment by one and a half margins.
                let level_now = Self::level(r.offers.get_indexed(cur.2).map(|x| x.1), cur_lat);
                let back = r.left.as_ref().is_some_and(|(n, t, lat)| {
                    same_id(n, id(best.2))
                        && now.saturating_duration_since(*t) < self.config.flap_window
                        && level_now <= lat.saturating_add(margin)
                        && cur_lat <= lat.saturating_add(margin.saturating_mul(3) / 2)
                });
                if back {
                    margin = margin.saturating_mul(2);
                }
                // The wait starts once the gain passes half the margin, and the move
                // needs the whole margin at its end: a real change grows as the RTT
                // average follows it, through the jitter of both routes.
                if best.0 .0.saturating_add(margin / 2) < cur_lat {
                    let since = match &r.better {
                        Some((n, t)) if n.as_str() == id(best.2) => *t,
                        _ => now,
                    };
                    better = Some((best.2, since));
                    let gain = best.0 .0.saturating_add(margin) < cur_lat;
                    // A gain of twice the margin is no jitter: no need to wait. Not
                    // without the wait while either link is jittery: where jitter
                    // starts, one link's RTT jumps before the other's spread shows it.
                    let wide = (cur_link.max(best_link) as f64 * k) as u64;
                    let clear = best.0 .0.saturating_add(2 * margin.max(wide)) < cur_lat;
                    weighed = Some((cur_lat, best.0 .0, margin, margin.max(wide)));
                    let waited = now.saturating_duration_since(since) >= self.config.better_for;
                    if !held && gain && (waited || clear) {
                        // Where the route taken stands: its level, or while that lags
                        // below (jitter just started) halfway into the gain, where two
                        // routes of equal mean meet on average; a level above the gain
                        // is the lag of a real change that made the route better.
                        let mid = best.0 .0.saturating_add(margin / 2);
                        let level =
                            Self::level(r.offers.get_indexed(best.2).map(|x| x.1), best.0 .0);
                        let top = best.0 .0.saturating_add(margin);
                        marginal = (!clear).then_some(level.min(top).max(mid));
                        Some(best.2)
                    } else {
                        Some(cur.2)
                    }
                } else {
                    Some(cur.2)
                }
            }
            (None, Some(best)) => {
                let ties = cands.iter().take_while(|(m, _, _)| *m == best.0).count();
                if ties > 1 && !draw {
                    return None;
                }
                let pick = if ties > 1 {
                    cands
                        .get(self.rng.usize(..ties))
                        .map_or(best.2, |(_, _, k)| *k)
                } else {
                    best.2
                };
                Some(pick)
            }
            (_, None) => None,
        };
        let old = r.parent.as_deref();
        let failed = old.is_some() && current.is_none();
        // Record the feasibility distance of the route taken (kept or new).
        let taken = new
            .and_then(|k| r.offers.get_indexed(k))
            .map(|(_, o)| (o.seq, u32::try_from(o.path.len()).unwrap_or(u32::MAX)));
        let better = better
            .filter(|(k, _)| new != Some(*k))
            .map(|(k, t)| (id(k).to_owned(), t));
        let had_parent = old.is_some();
        let lost = new.is_none();
        // The parent stays when the offer taken is its (same position, same id); owned
        // copies only when it changes.
        let kept = match (new, parent_pos) {
            (Some(k), Some(p)) => k == p,
            (new, _) => new.map(id) == old,
        };
        let change = (!kept).then(|| (old.map(str::to_owned), new.map(|k| id(k).to_owned())));
        Some(Choice {
            taken,
            better,
            had_parent,
            lost,
            failed,
            change,
            marginal,
            weighed,
        })
    }

    /// Whether `c`, chosen for the route at position `at`, leaves it as it is.
    fn keeps(&self, at: usize, c: &Choice) -> bool {
        self.routes.get_indexed(at).is_some_and(|(_, r)| {
            c.change.is_none()
                && !c.lost
                && r.lost_at.is_none()
                && c.better == r.better
                && c.taken.map(|(seq, hops)| advance_fd(r.fd, seq, hops)) == r.fd
        })
    }

    /// Whether neighbour `id` offers a route to any server. By its index
    /// ([`Route::offered_by`]): no id's bytes to compare, and no offer to read, each
    /// one more cache miss.
    fn offers_from(&self, id: &str) -> bool {
        let Some(i) = self.nb.index_of(id) else {
            return false;
        };
        self.routes.values().any(|r| r.offered_by(i))
    }

    /// After an ack from a neighbour that offers a route, whose RTT it moved: skip
    /// the update if weighing the offers again (the one part of it that reads that
    /// RTT) leaves the route as it is, and nothing else it reads changed (no time
    /// condition flipped: `quiet`, see [`Node::skip_update`]). Single-server nodes
    /// only, whose route has a parent; whether it was skipped.
    fn reweigh(&mut self, now: Instant, quiet: Option<Instant>) -> bool {
        if self.routes.len() != 1 || quiet.is_none_or(|q| now >= q) {
            return false;
        }
        let keeps = self.routes.first().is_some_and(|(_, r)| r.parent.is_some())
            && self
                .choose_parent(0, false)
                .is_some_and(|c| self.keeps(0, &c));
        keeps && self.skip_update(now, quiet)
    }

    /// Choose the parent of the route at position `at` ([`Node::choose_parent`]) and
    /// act on the choice.
    fn select_parent(&mut self, at: usize) {
        let now = self.now;
        let Some(Choice {
            taken,
            better,
            had_parent,
            lost,
            failed,
            change,
            marginal,
            weighed,
        }) = self.choose_parent(at, true)
        else {
            return;
        };
        // One lookup of the route for the three updates (this runs after every input).
        if let Some((_, r)) = self.routes.iter_mut().nth(at) {
            if let Some((seq, hops)) = taken {
                let fd = Some(advance_fd(r.fd, seq, hops));
                self.fd_moved |= r.fd != fd;
                r.fd = fd;
            }
            r.better = better;
            if !lost {
                r.lost_at = None;
            }
        }
        if !lost && change.is_none() {
            return;
        }
        // The server's id, only now (it is one more cache miss).
        let Some(server) = self.routes.get_indexed(at).map(|(k, _)| k.clone()) else {
            return;
        };
        let server = server.as_str();
        if lost {
            self.request_route(now, server, had_parent);
        }
        let Some((old, new)) = change else {
            return;
        };
        tracing::debug!(node = %self.config.id, server, ?old, ?new, ?marginal, ?weighed, "parent changed");
        self.stats.parent_changes += 1;
        if old.is_some() && new.is_none() {
            self.stats.routes_lost += 1;
        } else if failed {
            self.stats.failovers += 1;
        }
        if let Some(r) = self.routes.get_mut(server) {
            r.parent = new.clone();
            r.sync_offer_times();
            self.pointer_version += 1;
            r.sent_seq = None;
            r.changed_at = Some(now);
            if let (Some(o), Some(lat)) = (&old, marginal) {
                r.left = Some((o.clone(), now, lat));
            }
        }
        self.events.push_back(Event::ParentChanged {
            server: server.to_owned(),
            old,
            new: new.clone(),
        });
        if new.is_some() {
            self.reannounce(server);
        } else {
            self.withdraw_all(server);
        }
    }

    /// No feasible offer for `server`: ask the neighbours for a route (a fresh
    /// announcement), at once when the route was just `lost`, then every
    /// [`Route::rr_retry`] for [`RR_GIVE_UP`].
    fn request_route(&mut self, now: Instant, server: &str, lost: bool) {
        if self.config.role == Role::Server && server == self.config.id {
            return;
        }
        let Some(r) = self.routes.get_mut(server) else {
            return;
        };
        let Some((fd_seq, _)) = r.fd else {
            // Never had a route: nothing to be feasible against, wait for the flood.
            return;
        };
        if lost || r.lost_at.is_none() {
            r.lost_at = Some(now);
        }
        let lost_at = r.lost_at.unwrap_or(now);
        if now.saturating_duration_since(lost_at) > RR_GIVE_UP {
            return;
        }
        let retry = r.rr_retry();
        let due = r
            .requested
            .is_none_or(|(t, _)| lost || now.saturating_duration_since(t) >= retry);
        if !due {
            return;
        }
        let hops = self.config.route_request_hops;
        self.send_route_request(now, server, fd_seq.saturating_add(1), hops, None);
    }

    fn withdraw_all(&mut self, server: &str) {
        let Some(r) = self.routes.get_mut(server) else {
            return;
        };
        if r.withdrawn {
            return;
        }
        r.withdrawn = true;
        let seq = r.offers.values().map(|o| o.seq).max().unwrap_or(0);
        for info in self.nb.iter() {
            self.stats.withdraws_out += 1;
            self.transmits.push_back(ControlTransmit {
                to: info.addr,
                msg: withdraw(&self.config.id, server, seq),
            });
        }
    }

    /// The union of what the live children of `stream` ask to avoid, plus our own id
    /// when not empty (so no chain of subscriptions can come back through us).
    fn avoid_set(&self, now: Instant, stream: StreamId) -> Vec<NodeId> {
        let Some(st) = self.streams.get(&stream) else {
            return Vec::new();
        };
        let mut set: Vec<NodeId> = st
            .children
            .values()
            .filter(|c| c.expires > now && c.avoid_until.is_some_and(|t| t > now))
            .flat_map(|c| c.avoid.iter().cloned())
            .collect();
        if set.is_empty() {
            return set;
        }
        set.push(self.config.id.clone());
        set.sort();
        set.dedup();
        set.truncate(ott_proto::MAX_AVOID);
        set
    }

    /// Whether neighbour `n` offers `stream` over a path through none of `avoid` (the
    /// server at its root excepted); its (latency, hops) if so.
    fn offer_avoiding(&self, n: &str, stream: StreamId, avoid: &[NodeId]) -> Option<(u64, u32)> {
        self.routes
            .values()
            .filter_map(|r| {
                let o = r.offers.get(n)?;
                if !o.catalogue.iter().any(|s| s.id == stream) {
                    return None;
                }
                if o.path
                    .iter()
                    .skip(1)
                    .any(|x| avoid.binary_search(x).is_ok())
                {
                    return None;
                }
                self.eligible(n, o)
            })
            .min()
    }

    /// Where to take `stream` from given the children's avoid set: the usual source
    /// when its path avoids the set (or the set is empty), else the current upstream if
    /// it still does, else the best neighbour that does, else the usual source.
    fn upstream_for(&mut self, now: Instant, stream: StreamId) -> (Option<String>, Vec<NodeId>) {
        let usual = self.source_of(stream).flatten();
        let avoid = self.avoid_set(now, stream);
        let Some(parent) = usual.clone() else {
            return (usual, avoid);
        };
        if avoid.is_empty() || self.offer_avoiding(&parent, stream, &avoid).is_some() {
            return (usual, avoid);
        }
        let current = self.streams.get(&stream).and_then(|st| st.upstream.clone());
        if let Some(c) = current.filter(|c| self.offer_avoiding(c, stream, &avoid).is_some()) {
            return (Some(c), avoid);
        }
        let best = self
            .nb
            .iter()
            .filter_map(|info| {
                self.offer_avoiding(&info.id, stream, &avoid)
                    .map(|m| (m, info.id.clone()))
            })
            .min()
            .map(|(_, n)| n);
        match best {
            Some(n) => {
                self.stats.avoiding_upstreams += 1;
                (Some(n), avoid)
            }
            None => (usual, avoid),
        }
    }

    fn reconcile_streams(&mut self, now: Instant) {
        let ids: Vec<StreamId> = self.streams.keys().copied().collect();
        for id in ids {
            let (desired, avoid) = self.upstream_for(now, id);
            let Some(st) = self.streams.get_mut(&id) else {
                continue;
            };
            st.children.retain(|_, c| c.expires > now);
            // Never forward a stream back to the node we take it from.
            if let Some(up) = desired.as_deref() {
                st.children.retain(|_, c| c.node.as_deref() != Some(up));
            }
            let desired = if st.children.is_empty() {
                None
            } else {
                desired
            };
            let data_port = self.config.data_port;
            let me = self.config.id.clone();
            if desired.is_none() && st.upstream.is_some() {
                // Every path to the stream is lost: tell the viewers at once, so they
                // move to another PoP instead of waiting for the silence to show.
                self.stats.withdraws_out +=
                    withdraw_to_viewers(&st.children, &me, &mut self.transmits);
            }
            if desired != st.upstream {
                if let Some(new) = &desired {
                    if let Some(addr) = self.nb.addr_of(new) {
                        self.stats.joins_out += 1;
                        self.transmits.push_back(ControlTransmit {
                            to: addr,
                            msg: Message::Join {
                                stream: id,
                                data_port,
                                from: Some(me.clone()),
                            },
                        });
                    }
                    // The first repeat comes after about a round trip: a `Join` lost
                    // on a lossy path then costs that, not [`JOIN_RETRY`].
                    let first = self.nb.rtt_if_alive(new).map_or(JOIN_RETRY, |rtt| {
                        (rtt * 2 + QUICK_JOIN_SLACK).clamp(QUICK_JOIN_MIN, JOIN_RETRY)
                    });
                    st.next_refresh = Some(now + first.min(self.config.join_refresh));
                    st.quick_joins = QUICK_JOINS - 1;
                    st.quick_every = first;
                    st.joined_at = Some(now);
                    st.sent_avoid.clear();
                } else {
                    st.next_refresh = None;
                    st.joined_at = None;
                }
                if let Some(old) = st.upstream.take() {
                    if let Some(addr) = self.nb.addr_of(&old) {
                        self.stats.leaves_out += 1;
                        self.transmits.push_back(ControlTransmit {
                            to: addr,
                            msg: Message::Leave {
                                stream: id,
                                data_port,
                            },
                        });
                    }
                }
                st.upstream = desired;
                self.pointer_version += 1;
            } else if let (Some(up), Some(t)) = (&st.upstream, st.next_refresh) {
                if now >= t {
                    if let Some(addr) = self.nb.addr_of(up) {
                        self.stats.joins_out += 1;
                        self.transmits.push_back(ControlTransmit {
                            to: addr,
                            msg: Message::Join {
                                stream: id,
                                data_port,
                                from: Some(me),
                            },
                        });
                    }
                    st.next_refresh = Some(if st.quick_joins > 1 {
                        st.quick_joins -= 1;
                        now + st.quick_every.min(self.config.join_refresh)
                    } else {
                        st.quick_joins = 0;
                        now + self.config.join_refresh
                    });
                    // Repeated with each Join, as soft state.
                    st.sent_avoid.clear();
                }
            }
            // What our children avoid, our upstream must avoid too (with us in it).
            if let Some(up) = st.upstream.as_deref() {
                if avoid != st.sent_avoid && !(avoid.is_empty() && st.sent_avoid.is_empty()) {
                    if let Some(addr) = self.nb.addr_of(up) {
                        self.stats.avoids_out += 1;
                        self.transmits.push_back(ControlTransmit {
                            to: addr,
                            msg: Message::Avoid {
                                stream: id,
                                data_port,
                                avoid: avoid.clone(),
                            },
                        });
                    }
                    st.sent_avoid = avoid;
                }
            }
            let fwd: Vec<SocketAddr> = st.children.keys().copied().collect();
            if fwd != st.last_forwarding {
                st.last_forwarding = fwd.clone();
                let sessions = st
                    .children
                    .iter()
                    .filter_map(|(a, c)| c.session.clone().map(|k| (*a, k)))
                    .collect();
                self.events.push_back(Event::Forwarding {
                    stream: id,
                    children: fwd,
                    sessions,
                });
            }
            if st.children.is_empty() && st.upstream.is_none() {
                self.streams.remove(&id);
            }
        }
    }

    /// A snapshot for `/status`.
    pub fn status(&self) -> NodeStatus {
        let servers: Vec<RouteStatus> = self.routes.keys().map(|s| self.route_status(s)).collect();
        let best = if self.config.role == Role::Server {
            RouteStatus {
                server: self.config.id.clone(),
                parent: None,
                path: vec![self.config.id.clone()],
                latency_ms: Some(0.0),
                hops: Some(0),
            }
        } else {
            self.best_server()
                .map(|s| self.route_status(&s))
                .unwrap_or(RouteStatus {
                    server: String::new(),
                    parent: None,
                    path: Vec::new(),
                    latency_ms: None,
                    hops: None,
                })
        };
        let names: BTreeMap<StreamId, String> = self
            .catalogue()
            .into_iter()
            .map(|s| (s.id, s.name))
            .collect();
        let mut streams: BTreeMap<String, StreamStatus> = self
            .streams
            .iter()
            .map(|(id, st)| {
                let name = names
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| format!("{id:#010x}"));
                let children = st
                    .children
                    .iter()
                    .map(|(a, c)| c.node.clone().unwrap_or_else(|| format!("client@{a}")))
                    .collect();
                (
                    name,
                    StreamStatus {
                        id: *id,
                        upstream: st.upstream.clone(),
                        children,
                    },
                )
            })
            .collect();
        // Every reachable stream is listed, watched or not.
        for (id, name) in names {
            streams.entry(name).or_insert(StreamStatus {
                id,
                upstream: None,
                children: Vec::new(),
            });
        }
        NodeStatus {
            id: self.config.id.clone(),
            role: self.config.role.to_string(),
            parent: best.parent,
            path: best.path,
            latency_ms: best.latency_ms,
            hops: best.hops,
            neighbours: self
                .nb
                .iter()
                .map(|n| NeighbourStatus {
                    id: n.id,
                    alive: n.alive,
                    rtt_ms: n.rtt.map(|r| r.as_secs_f64() * 1000.0),
                })
                .collect(),
            streams,
            servers,
        }
    }

    fn route_status(&self, server: &str) -> RouteStatus {
        let r = self.routes.get(server);
        let parent = r.and_then(|r| r.parent.clone());
        let offer = r.and_then(|r| parent.as_ref().and_then(|p| r.offers.get(p)));
        let metric = self.route_metric(server);
        let path = match (offer, metric) {
            (Some(o), Some(_)) => {
                let mut p = o.path.clone();
                p.push(self.config.id.clone());
                p
            }
            _ => Vec::new(),
        };
        RouteStatus {
            server: server.to_owned(),
            parent,
            path,
            latency_ms: metric.map(|(l, _)| ms(l)),
            hops: metric.map(|(_, h)| h),
        }
    }

    /// Check this node's local invariants: no parent whose offered path contains us, every
    /// parent alive, no stream forwarded to the node it is taken from. For tests and the
    /// simulator; returns a description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let me = &self.config.id;
        for (server, r) in &self.routes {
            if let Some(p) = &r.parent {
                let o = r
                    .offers
                    .get(p)
                    .ok_or_else(|| format!("{me}: parent {p} for {server} has no offer"))?;
                if o.through_us {
                    return Err(format!(
                        "{me}: parent {p} for {server} has a path through us"
                    ));
                }
                if !self.nb.is_alive(p) {
                    return Err(format!("{me}: parent {p} for {server} is dead"));
                }
                let theirs = o.path.len().saturating_sub(1);
                match r.fd {
                    Some((seq, hops)) if seq == o.seq && (theirs as u64) < u64::from(hops) => {}
                    fd => {
                        return Err(format!(
                            "{me}: parent {p} for {server} is not feasible (offer seq {} hops {theirs}, fd {fd:?})",
                            o.seq
                        ))
                    }
                }
            }
        }
        for (id, st) in &self.streams {
            if let Some(up) = &st.upstream {
                if st.children.values().any(|c| c.node.as_ref() == Some(up)) {
                    return Err(format!(
                        "{me}: stream {id:#x} upstream {up} is also a child"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
// Tests take the real clock as an arbitrary origin of fake time, and read sample files.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use ott_proto::MediaKind;

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 7000))
    }

    fn drain(n: &mut Node) -> Vec<ControlTransmit> {
        while n.poll_event().is_some() {}
        std::iter::from_fn(|| n.poll_transmit()).collect()
    }

    fn pop() -> (Node, Instant) {
        let t0 = Instant::now();
        let cfg = NodeConfig::new("p", Role::Pop, 7001);
        let mut n = Node::new(cfg, vec![("s".into(), addr(1))], t0, t0);
        drain(&mut n);
        (n, t0)
    }

    #[test]
    fn test_probe_and_unknown_stream() {
        let (mut n, t0) = pop();
        let client = SocketAddr::from(([10, 9, 9, 9], 5555));
        n.handle(
            t0,
            client,
            Message::Probe {
                nonce: 3,
                sent_us: 77,
            },
        );
        let tx = drain(&mut n);
        assert!(matches!(
            &tx[..],
            [ControlTransmit {
                msg: Message::ProbeReply {
                    nonce: 3,
                    echo_us: 77,
                    path_latency_us: None,
                    ..
                },
                ..
            }]
        ));
        let join = Message::Join {
            stream: 1,
            data_port: 9000,
            from: None,
        };
        n.handle(t0, client, join);
        let tx = drain(&mut n);
        assert!(matches!(
            &tx[..],
            [ControlTransmit {
                msg: Message::Error { .. },
                ..
            }]
        ));
        assert_eq!(n.stats().errors_out, 1);
    }

    fn hb(from: &str, inc: u64) -> Message {
        Message::Heartbeat {
            from: from.into(),
            seq: 1,
            sent_us: 0,
            incarnation: inc,
        }
    }

    fn announce(seq: u64, streams: &[&str]) -> Message {
        Message::Announce {
            server: "s".into(),
            seq,
            path: vec!["s".into()],
            latency_us: 0,
            catalogue: streams
                .iter()
                .map(|n| StreamInfo::new(*n, MediaKind::Mjpeg, 25_000))
                .collect(),
        }
    }

    fn names(n: &Node) -> Vec<String> {
        n.catalogue().into_iter().map(|s| s.name).collect()
    }

    /// A PoP whose server neighbour `s` has two addresses, `s` alive with an RTT.
    fn pop_of_multihomed_server() -> (Node, Instant) {
        let t0 = Instant::now();
        let cfg = NodeConfig::new("p", Role::Pop, 7001);
        let s = PeerAddrs::new("s", addr(1), vec![addr(1), addr(11)]);
        let mut n = Node::with_peers(cfg, vec![s], t0, t0);
        n.handle(t0, addr(11), hb("s", 5));
        let ack = Message::HeartbeatAck {
            from: "s".into(),
            seq: 1,
            echo_us: 0,
            incarnation: 5,
        };
        n.handle(t0 + Duration::from_millis(2), addr(1), ack);
        drain(&mut n);
        (n, t0)
    }

    #[test]
    fn test_neighbour_known_by_every_given_address_and_no_other() {
        let (mut n, t0) = pop_of_multihomed_server();
        assert!(n.neighbours().is_alive("s"));
        // Announced from its second address: taken.
        n.handle(t0, addr(11), announce(100, &["news"]));
        assert_eq!(n.parent("s"), Some("s"));
        assert_eq!(names(&n), ["news"]);
        // A stranger claims to be s with a heartbeat (which used to make it an alias),
        // then announces: nothing of it is taken, and it gets no answer.
        let forger = SocketAddr::from(([192, 0, 2, 66], 7000));
        n.handle(t0, forger, hb("s", 5));
        assert!(drain(&mut n).iter().all(|t| t.to != forger));
        n.handle(t0, forger, announce(101, &["evil"]));
        n.handle(
            t0,
            forger,
            Message::Withdraw {
                from: "s".into(),
                server: "s".into(),
                seq: 101,
            },
        );
        assert_eq!(names(&n), ["news"]);
        assert_eq!(n.parent("s"), Some("s"));
        assert_eq!(n.stats().unknown_sender, 2);
        assert_eq!(n.neighbours().unknown_sender_count(), 1);
        // s's own address, withdrawing in another node's name: not s's word either.
        n.handle(
            t0,
            addr(1),
            Message::Withdraw {
                from: "q".into(),
                server: "s".into(),
                seq: 101,
            },
        );
        assert_eq!(n.parent("s"), Some("s"));
        assert_eq!(n.stats().unknown_sender, 3);
    }

    #[test]
    fn test_announcement_seq_may_not_jump_far_ahead() {
        let (mut n, t0) = pop_of_multihomed_server();
        let s0 = 1_000_000_000;
        n.handle(t0, addr(1), announce(s0, &["news"]));
        assert_eq!(names(&n), ["news"]);
        // A forged announcement (from s's address: without a key anyone can send one)
        // a day ahead, one second later, with a catalogue of its own: refused.
        let t1 = t0 + Duration::from_secs(1);
        n.handle(t1, addr(1), announce(s0 + 86_400_000_000, &["evil"]));
        assert_eq!(n.stats().seq_too_far, 1);
        assert_eq!(names(&n), ["news"]);
        // s's real next announcement, one second on, is still taken.
        n.handle(t1, addr(1), announce(s0 + 1_000_000, &["news", "sport"]));
        assert_eq!(names(&n), ["news", "sport"]);
        // Up to elapsed + elapsed / 8 + the slack (2 s) ahead is allowed: after 8 s
        // more, 8 + 1 + 2 = 11 s past the newest seq, but not a microsecond further.
        let t2 = t1 + Duration::from_secs(8);
        n.handle(t2, addr(1), announce(s0 + 12_000_001, &["evil"]));
        assert_eq!(n.stats().seq_too_far, 2);
        n.handle(t2, addr(1), announce(s0 + 12_000_000, &["news"]));
        assert_eq!(n.stats().seq_too_far, 2);
        assert_eq!(names(&n), ["news"]);
    }

    fn route_request(from: &str, seq: u64) -> Message {
        Message::RouteRequest {
            from: from.into(),
            server: "s".into(),
            seq,
            hops_left: 3,
        }
    }

    #[test]
    fn test_offered_by_names_the_neighbours_with_an_offer_beyond_the_masks_bits_too() {
        let offer = |nb: Option<usize>| Offer {
            nb,
            path: vec!["s".into()],
            through_us: false,
            latency_us: 1_000,
            seq: 1,
            at: Instant::now(),
            catalogue: Vec::new(),
            last_us: None,
            dev_us: 0,
            avg_us: 1_000,
        };
        let mut r = Route::default();
        for (id, nb) in [
            ("a", Some(0)),
            ("b", Some(62)),
            ("c", Some(70)),
            ("d", None),
        ] {
            r.offers.insert(id.into(), offer(nb));
        }
        r.sync_offer_times();
        let with: Vec<usize> = (0..100).filter(|&i| r.offered_by(i)).collect();
        assert_eq!(with, [0, 62, 70]);
        r.offers.remove("c");
        r.sync_offer_times();
        assert!(!r.offered_by(70) && !r.offered_by(63) && r.offered_by(62));
    }

    #[test]
    fn test_a_route_request_is_repeated_after_a_round_trip_to_the_server() {
        let offer = |latency_us: u64| Offer {
            nb: None,
            path: vec!["s".into()],
            through_us: false,
            latency_us,
            seq: 1,
            at: Instant::now(),
            catalogue: Vec::new(),
            last_us: None,
            dev_us: 0,
            avg_us: latency_us,
        };
        let mut r = Route::default();
        assert_eq!(r.rr_retry(), RR_RETRY, "no offer: no idea of the distance");
        r.offers.insert("a".into(), offer(30_000));
        r.offers.insert("b".into(), offer(12_000));
        // The nearest neighbour's way: 12 ms one way, asked again after 3 × 12 + 20 ms.
        assert_eq!(r.rr_retry(), Duration::from_millis(56));
        r.offers.insert("c".into(), offer(1_000));
        assert_eq!(r.rr_retry(), RR_RETRY_MIN);
        r.offers.clear();
        r.offers.insert("far".into(), offer(500_000));
        assert_eq!(r.rr_retry(), RR_RETRY);
    }

    #[test]
    fn test_server_answers_a_route_request_with_a_fresh_seq_rate_limited() {
        let t0 = Instant::now();
        let cfg = NodeConfig::new("s", Role::Server, 7001);
        let mut n = Node::new(cfg, vec![("p".to_owned(), addr(2))], t0, t0);
        n.handle_timeout(t0);
        n.handle(t0, addr(2), hb("p", 1));
        drain(&mut n);
        let t1 = t0 + Duration::from_millis(300);
        n.handle(t1, addr(2), route_request("p", 1));
        let fresh: Vec<u64> = drain(&mut n)
            .into_iter()
            .filter_map(|t| match t.msg {
                Message::Announce { seq, .. } if t.to == addr(2) => Some(seq),
                _ => None,
            })
            .collect();
        assert_eq!(fresh, [300_000], "a fresh announcement at once");
        assert_eq!(n.stats().triggered_announces, 1);
        // A burst: 64 tokens a second, one already spent; no more than one fresh
        // announcement per 10 ms however many ask.
        for _ in 0..100 {
            n.handle(t1, addr(2), route_request("p", 1));
        }
        assert_eq!(n.stats().route_requests_answered, 64);
        assert_eq!(n.stats().route_requests_limited, 37);
        assert_eq!(n.stats().triggered_announces, 1);
        // A request naming another node than the sender's is refused.
        let unknown = n.stats().unknown_sender;
        n.handle(t1 + Duration::from_secs(1), addr(2), route_request("x", 1));
        assert_eq!(n.stats().unknown_sender, unknown + 1);
    }

    #[test]
    fn test_silence_from_the_parent_moves_the_node_at_once() {
        let t0 = Instant::now();
        let cfg = NodeConfig::new("p", Role::Pop, 7001);
        let peers = vec![("a".to_owned(), addr(1)), ("b".to_owned(), addr(2))];
        let mut n = Node::new(cfg, peers, t0, t0);
        for (id, a) in [("a", addr(1)), ("b", addr(2))] {
            n.handle(t0, a, hb(id, 1));
            let ack = Message::HeartbeatAck {
                from: id.into(),
                seq: 1,
                echo_us: 0,
                incarnation: 1,
            };
            n.handle(t0 + Duration::from_millis(2), a, ack);
        }
        let offer = |via: &str, lat: u64| Message::Announce {
            server: "s".into(),
            seq: 1,
            path: vec!["s".into(), via.into()],
            latency_us: lat,
            catalogue: vec![StreamInfo::new("news", MediaKind::Mjpeg, 25_000)],
        };
        n.handle(t0, addr(1), offer("a", 1_000));
        n.handle(t0, addr(2), offer("b", 5_000));
        assert_eq!(n.parent("s"), Some("a"));
        drain(&mut n);
        // A subscription makes the stream live here.
        let news = ott_proto::stream_id_for("news");
        n.handle(
            t0,
            SocketAddr::from(([10, 0, 0, 2], 7000)),
            Message::Join {
                stream: news,
                data_port: 7001,
                from: Some("b".into()),
            },
        );
        let _ = drain(&mut n);
        assert_eq!(n.upstream(news), Some("a"));
        // A hint about a node that is not the stream's upstream is ignored.
        let t1 = t0 + Duration::from_millis(200);
        n.handle_upstream_silent(t1, "b", news, t0);
        assert_eq!(n.stats().suspect_parents, 0);
        // A parent heard from 30 ms ago is alive: the break is further up, not moved.
        n.handle(t1 - Duration::from_millis(30), addr(1), hb("a", 1));
        n.handle_upstream_silent(t1, "a", news, t0);
        assert_eq!(n.stats().suspect_parents, 0);
        assert_eq!(n.stats().upstream_silent_parent_alive, 1);
        assert_eq!(n.parent("s"), Some("a"));
        // Unheard for over a heartbeat interval while its media is silent: suspected.
        let t1 = t1 + Duration::from_millis(150);
        n.handle_upstream_silent(t1, "a", news, t0);
        assert_eq!(n.stats().suspect_parents, 1);
        // b's offer (5 ms) is feasible: the node moves there at once, not after the
        // 400 ms a dead parent takes to be declared dead.
        assert_eq!(n.parent("s"), Some("b"), "a suspected parent is left");
        assert_eq!(n.stats().failovers, 1);
    }

    /// A node `me` of `role` with neighbours a, b and c, each one's heartbeat answered
    /// at t0.
    fn with_three_neighbours(me: &str, role: Role) -> (Node, Instant) {
        let t0 = Instant::now();
        let cfg = NodeConfig::new(me, role, 7001);
        let peers = vec![
            ("a".to_owned(), addr(1)),
            ("b".to_owned(), addr(2)),
            ("c".to_owned(), addr(3)),
        ];
        let mut n = Node::new(cfg, peers, t0, t0);
        for (id, a) in [("a", addr(1)), ("b", addr(2)), ("c", addr(3))] {
            n.handle(t0, a, hb(id, 1));
            let ack = Message::HeartbeatAck {
                from: id.into(),
                seq: 1,
                echo_us: 0,
                incarnation: 1,
            };
            n.handle(t0 + Duration::from_millis(2), a, ack);
        }
        (n, t0)
    }

    /// A node `me` of `role` with neighbours a, b and c (heartbeats answered at t0),
    /// offered routes to s by a (1 ms, path `a_path`) and b (5 ms, path `b_path`).
    fn three_neighbours(me: &str, role: Role, a_path: &[&str], b_path: &[&str]) -> (Node, Instant) {
        let (mut n, t0) = with_three_neighbours(me, role);
        let offer = |path: &[&str], lat: u64| Message::Announce {
            server: "s".into(),
            seq: 1,
            path: path.iter().map(|&p| p.into()).collect(),
            latency_us: lat,
            catalogue: vec![StreamInfo::new("news", MediaKind::Mjpeg, 25_000)],
        };
        n.handle(t0, addr(1), offer(a_path, 1_000));
        n.handle(t0, addr(2), offer(b_path, 5_000));
        assert_eq!(n.parent("s"), Some("a"));
        drain(&mut n);
        (n, t0)
    }

    #[test]
    fn test_an_announcement_overtaken_at_the_same_seq_is_stale() {
        // a reaches s through x (2 hops), then moves to a direct link and announces the
        // same seq with the shorter path; jitter delivers the older, longer one last.
        let (mut n, t0) = with_three_neighbours("p", Role::Pop);
        let offer = |path: &[&str]| Message::Announce {
            server: "s".into(),
            seq: 7,
            path: path.iter().map(|&p| p.into()).collect(),
            latency_us: 1_000,
            catalogue: vec![StreamInfo::new("news", MediaKind::Mjpeg, 25_000)],
        };
        n.handle(t0, addr(1), offer(&["s", "a"]));
        assert_eq!(n.parent("s"), Some("a"));
        assert_eq!(n.status().hops, Some(2));
        let ignored = n.stats().ignored;
        n.handle(t0, addr(1), offer(&["s", "x", "a"]));
        // Taken, it would have made our own route unfeasible (at seq 7 we were two
        // hops away): the node would have dropped its parent and asked for a route.
        assert_eq!(n.stats().ignored, ignored + 1);
        assert_eq!(n.parent("s"), Some("a"));
        assert_eq!(n.status().path, ["s", "a", "p"]);
        assert_eq!(n.stats().parent_changes, 1);
        // A newer seq with the longer path is news, not a stale copy.
        let newer = Message::Announce {
            server: "s".into(),
            seq: 8,
            path: vec!["s".into(), "x".into(), "a".into()],
            latency_us: 1_000,
            catalogue: vec![StreamInfo::new("news", MediaKind::Mjpeg, 25_000)],
        };
        n.handle(t0, addr(1), newer);
        assert_eq!(n.status().path, ["s", "x", "a", "p"]);
    }

    #[test]
    fn test_a_first_join_while_the_parent_is_quiet_moves_the_node() {
        // A relay that carries nothing under a, with a way round through b; c subscribes
        // a stream (a viewer moving here because its PoP lost its path would too).
        let (mut n, t0) = three_neighbours("r", Role::Relay, &["s", "a"], &["s", "b"]);
        let news = ott_proto::stream_id_for("news");
        let join = |n: &mut Node, t: Instant| {
            n.handle(
                t,
                addr(3),
                Message::Join {
                    stream: news,
                    data_port: 9,
                    from: Some("c".into()),
                },
            )
        };
        // a heard 30 ms ago: alive, the stream is taken from it.
        let t1 = t0 + Duration::from_millis(200);
        n.handle(t1 - Duration::from_millis(30), addr(1), hb("a", 1));
        join(&mut n, t1);
        assert_eq!(n.stats().suspect_on_join, 0);
        assert_eq!(n.upstream(news), Some("a"));
        // A refresh of a carried stream is no first join, however quiet a is.
        join(&mut n, t1 + Duration::from_millis(60));
        assert_eq!(n.stats().suspect_on_join, 0);
        // The stream dropped (its child gone), then subscribed again while a has been
        // quiet for over a heartbeat interval: a is suspected and the stream comes
        // through b at once, long before a is declared dead.
        n.handle(
            t1 + Duration::from_millis(70),
            addr(3),
            Message::Leave {
                stream: news,
                data_port: 9,
            },
        );
        assert_eq!(n.upstream(news), None);
        join(&mut n, t1 + Duration::from_millis(80));
        assert_eq!(n.stats().suspect_on_join, 1);
        assert_eq!(n.parent("s"), Some("b"));
        assert_eq!(n.upstream(news), Some("b"));
    }

    #[test]
    fn test_a_route_request_while_the_parent_is_quiet_moves_the_node() {
        // A relay that carries no stream (so no silence hint) under a, with a way round
        // through b; c, whose route also ran through a, asks for a route.
        let (mut n, t0) = three_neighbours("r", Role::Relay, &["s", "a"], &["s", "b"]);
        // a heard 30 ms ago: alive, nothing happens.
        let t1 = t0 + Duration::from_millis(200);
        n.handle(t1 - Duration::from_millis(30), addr(1), hb("a", 1));
        n.handle(t1, addr(3), route_request("c", 2));
        assert_eq!(n.stats().suspect_on_request, 0);
        assert_eq!(n.parent("s"), Some("a"));
        // a silent for 150 ms (over a heartbeat interval) when c asks: suspected, and
        // the relay moves to b at once, long before a is declared dead.
        let t2 = t1 + Duration::from_millis(120);
        n.handle(t2, addr(3), route_request("c", 2));
        assert_eq!(n.stats().suspect_on_request, 1);
        assert_eq!(n.stats().suspect_parents, 1);
        assert_eq!(n.parent("s"), Some("b"));
        // It answers c with its new route, and passes the request on to b for a fresh
        // seq (its route, seq 1, is older than the 2 asked for).
        let tx = drain(&mut n);
        assert!(tx.iter().any(|t| t.to == addr(3)
            && matches!(&t.msg, Message::Announce { path, .. } if path.len() == 3 && path[1] == "b")));
        assert!(tx
            .iter()
            .any(|t| t.to == addr(2) && matches!(t.msg, Message::RouteRequest { .. })));
    }

    /// Run `n` from `from` to `to` in 50 ms steps, every neighbour's heartbeat heard at
    /// each, `answer` called at each step with the route requests sent: what it
    /// returns is handled then.
    fn run_alive(
        n: &mut Node,
        from: Instant,
        to: Instant,
        mut answer: impl FnMut(Instant, &[ControlTransmit]) -> Vec<(SocketAddr, Message)>,
    ) -> Vec<ControlTransmit> {
        let mut requests = Vec::new();
        let mut t = from;
        while t < to {
            t += Duration::from_millis(50);
            for (id, a) in [("a", addr(1)), ("b", addr(2)), ("c", addr(3))] {
                n.handle(t, a, hb(id, 1));
            }
            n.handle_timeout(t);
            let sent: Vec<ControlTransmit> = drain(n)
                .into_iter()
                .filter(|x| matches!(x.msg, Message::RouteRequest { .. }))
                .collect();
            for (a, m) in answer(t, &sent) {
                n.handle(t, a, m);
            }
            requests.extend(sent);
        }
        requests
    }

    /// Heartbeats from neighbours already alive skip the update, but never past one of
    /// its deadlines: the late parent is asked for its announcement, and the expired
    /// offers are dropped, at the first heartbeat at or after their instant, as a full
    /// update after every heartbeat would do (debug builds also check every 16th
    /// skipped update against a full one on a copy).
    #[test]
    fn test_heartbeats_skip_the_update_but_not_its_deadlines() {
        let (mut n, t0) = three_neighbours("x", Role::Relay, &["s", "a"], &["s", "b"]);
        let cfg = n.config().clone();
        let late = t0 + cfg.announce_interval + cfg.announce_interval / 2;
        let expired = t0 + cfg.route_expiry;
        let before = n.changing_inputs();
        let (mut heartbeats, mut asked, mut lost) = (0u64, None, None);
        let mut t = t0;
        while t < expired + Duration::from_millis(100) {
            t += Duration::from_millis(10);
            for (id, a) in [("a", addr(1)), ("b", addr(2)), ("c", addr(3))] {
                n.handle(t, a, hb(id, 1));
                heartbeats += 1;
            }
            let refresh = drain(&mut n)
                .iter()
                .any(|x| matches!(x.msg, Message::RouteRequest { .. }));
            if refresh && asked.is_none() {
                asked = Some(t);
            }
            if n.parent("s").is_none() && lost.is_none() {
                lost = Some(t);
            }
        }
        let first_at_or_after = |d: Instant| {
            let steps = d
                .saturating_duration_since(t0)
                .as_nanos()
                .div_ceil(10_000_000);
            t0 + Duration::from_millis(10 * steps as u64)
        };
        assert_eq!(asked, Some(first_at_or_after(late)), "late parent asked");
        assert_eq!(
            lost,
            Some(first_at_or_after(expired)),
            "expired offers dropped"
        );
        let changing = n.changing_inputs() - before;
        assert!(
            changing * 10 < heartbeats,
            "{changing} of {heartbeats} heartbeats ran the update"
        );
    }

    /// Acks and heartbeat timers skip the update too, but never a change: against the
    /// same run with every update made, the parent moves at the same instant when a's
    /// RTT grows (an ack sample that makes b's offer better is weighed) and the routes
    /// end the same; meanwhile acks from c, which offers no route, and timers that only
    /// send heartbeats ran almost no update.
    #[test]
    fn test_acks_and_heartbeat_timers_skip_the_update_but_not_a_parent_change() {
        let run = |skip: bool| {
            let (mut n, t0) = three_neighbours("x", Role::Relay, &["s", "a"], &["s", "b"]);
            let slow_from = t0 + Duration::from_millis(600);
            // Acks on their way: (arrival, from, ack).
            let mut acks: Vec<(Instant, SocketAddr, Message)> = Vec::new();
            // (inputs, of which ran the update) before a slows, and of c's acks.
            let (mut steady, mut of_c) = ((0u64, 0u64), (0u64, 0u64));
            let mut moved = None;
            let mut t = t0;
            while t < t0 + Duration::from_millis(1_400) {
                t += Duration::from_millis(1);
                let mut inputs: Vec<(Option<SocketAddr>, Option<Message>)> = Vec::new();
                if n.poll_timeout().is_some_and(|d| d <= t) {
                    inputs.push((None, None));
                }
                while acks.first().is_some_and(|(at, ..)| *at <= t) {
                    let (_, from, ack) = acks.remove(0);
                    inputs.push((Some(from), Some(ack)));
                }
                for (from, msg) in inputs {
                    if !skip {
                        n.quiet_until = None;
                    }
                    let before = n.changing_inputs();
                    match (from, msg) {
                        (Some(from), Some(msg)) => n.handle(t, from, msg),
                        _ => n.handle_timeout(t),
                    }
                    let ran = n.changing_inputs() - before;
                    if t < slow_from {
                        steady = (steady.0 + 1, steady.1 + ran);
                    }
                    if from == Some(addr(3)) {
                        of_c = (of_c.0 + 1, of_c.1 + ran);
                    }
                }
                for x in drain(&mut n) {
                    let Message::Heartbeat { seq, sent_us, .. } = x.msg else {
                        continue;
                    };
                    let (id, rtt_ms) = match x.to {
                        a if a == addr(1) && t >= slow_from => ("a", 40),
                        a if a == addr(1) => ("a", 2),
                        a if a == addr(2) => ("b", 2),
                        _ => ("c", 2),
                    };
                    let ack = Message::HeartbeatAck {
                        from: id.into(),
                        seq,
                        echo_us: sent_us,
                        incarnation: 1,
                    };
                    acks.push((t + Duration::from_millis(rtt_ms), x.to, ack));
                }
                acks.sort_by_key(|(at, ..)| *at);
                if moved.is_none() && n.parent("s") == Some("b") {
                    moved = Some(t.saturating_duration_since(t0));
                }
            }
            // The route as it ends, its instants counted from the start.
            let since = |t: Instant| t.saturating_duration_since(t0);
            let route = n.routes.get("s").map(|r| {
                (
                    r.parent.clone(),
                    r.fd,
                    r.changed_at.map(since),
                    r.better.as_ref().map(|(b, t)| (b.clone(), since(*t))),
                    r.left
                        .as_ref()
                        .map(|(l, t, lat)| (l.clone(), since(*t), *lat)),
                )
            });
            (route, moved, steady, of_c)
        };
        let (routes, moved, steady, of_c) = run(true);
        let (full_routes, full_moved, full_steady, _) = run(false);
        assert_eq!(
            full_steady.0, full_steady.1,
            "the reference updates after every input"
        );
        assert!(moved.is_some(), "a's slow link moves the parent to b");
        assert_eq!(
            moved, full_moved,
            "the parent moves when it would with every update"
        );
        assert_eq!(routes, full_routes);
        assert!(
            steady.1 * 10 < steady.0 && steady.0 >= 40,
            "{} of {} acks and timers ran the update",
            steady.1,
            steady.0
        );
        assert!(
            of_c.0 >= 20 && of_c.1 * 20 < of_c.0,
            "{} of c's {} acks ran the update",
            of_c.1,
            of_c.0
        );
    }

    #[test]
    fn test_a_parent_late_with_its_announcement_is_asked_for_it() {
        let offer = |seq: u64| Message::Announce {
            server: "s".into(),
            seq,
            path: vec!["s".into(), "a".into()],
            latency_us: 1_000,
            catalogue: vec![StreamInfo::new("news", MediaKind::Mjpeg, 25_000)],
        };
        // a's announcements (seq 1 at t0) stop coming: lost on the way.
        let (mut n, t0) = three_neighbours("r", Role::Relay, &["s", "a"], &["s", "b"]);
        let early = run_alive(&mut n, t0, t0 + Duration::from_millis(1_450), |_, _| vec![]);
        assert!(
            early.is_empty(),
            "not before one and a half periods: {early:?}"
        );
        // Then the parent alone is asked, for a newer seq, one hop only, every half
        // period; answers at the same seq are no news: the route still expires.
        let asked = run_alive(
            &mut n,
            t0 + Duration::from_millis(1_450),
            t0 + Duration::from_millis(3_600),
            |_, sent| {
                sent.iter()
                    .filter(|x| {
                        x.to == addr(1)
                            && matches!(x.msg, Message::RouteRequest { hops_left: 1, .. })
                    })
                    .map(|_| (addr(1), offer(1)))
                    .collect()
            },
        );
        let (refreshes, lost): (Vec<_>, Vec<_>) = asked
            .iter()
            .partition(|x| matches!(x.msg, Message::RouteRequest { hops_left: 1, .. }));
        assert_eq!(refreshes.len(), 4, "at 1.5, 2, 2.5 and 3 s: {asked:?}");
        assert!(refreshes
            .iter()
            .all(|x| x.to == addr(1) && matches!(x.msg, Message::RouteRequest { seq: 2, .. })));
        assert_eq!(n.stats().route_refreshes, 4);
        assert_eq!(n.parent("s"), None, "a dead server's routes expire");
        assert_eq!(lost.len(), 3, "then the lost route is asked of everyone");
        // The same, a answering each time with the seq it missed: the route lives on,
        // a new seq asked for once per one and a half periods.
        let (mut n, t0) = three_neighbours("r", Role::Relay, &["s", "a"], &["s", "b"]);
        let mut seq = 1;
        let asked = run_alive(&mut n, t0, t0 + Duration::from_secs(4), |_, sent| {
            sent.iter()
                .map(|_| {
                    seq += 1;
                    (addr(1), offer(seq))
                })
                .collect()
        });
        assert_eq!(asked.len(), 2, "at 1.5 and 3 s: {asked:?}");
        assert_eq!(n.parent("s"), Some("a"));
    }

    #[test]
    fn test_a_request_of_one_hop_is_answered_not_passed_on_nor_suspected() {
        // c's announcements from r got lost: c asks r, its parent, for a seq r does
        // not have either. r answers with what it has, does not pass the request on
        // (its own refresh does that) and, though its parent a is quiet, suspects
        // nothing: c lost no route.
        let (mut n, t0) = three_neighbours("r", Role::Relay, &["s", "a"], &["s", "b"]);
        let t1 = t0 + Duration::from_millis(200);
        n.handle(t1, addr(2), hb("b", 1));
        n.handle(
            t1,
            addr(3),
            Message::RouteRequest {
                from: "c".into(),
                server: "s".into(),
                seq: 2,
                hops_left: 1,
            },
        );
        assert_eq!(n.stats().suspect_parents, 0);
        assert_eq!(n.parent("s"), Some("a"));
        let tx = drain(&mut n);
        assert!(tx
            .iter()
            .any(|t| t.to == addr(3) && matches!(t.msg, Message::Announce { seq: 1, .. })));
        assert!(!tx
            .iter()
            .any(|t| matches!(t.msg, Message::RouteRequest { .. })));
    }

    #[test]
    fn test_a_route_request_from_the_parent_moves_the_node_or_warns_its_viewers() {
        // A relay under a with a way round through b: a asks for a route (it suspects
        // its own parent, whose heartbeats stopped; a's still come): r moves at once.
        let (mut n, t0) = three_neighbours("r", Role::Relay, &["s", "a"], &["s", "b"]);
        let t1 = t0 + Duration::from_millis(100);
        n.handle(t1 - Duration::from_millis(10), addr(1), hb("a", 1));
        n.handle(t1, addr(1), route_request("a", 2));
        assert_eq!(n.stats().suspect_parent_asking, 1);
        assert_eq!(n.parent("s"), Some("b"));
        // A PoP whose only other offer runs through a too: it stays, warns its viewer
        // (who moves to another PoP now, not when a's death is declared below it)
        // and asks around.
        let (mut n, t0) = three_neighbours("p", Role::Pop, &["s", "a"], &["s", "a", "b"]);
        let news = ott_proto::stream_id_for("news");
        let client = viewer_joins(&mut n, t0, news);
        let t1 = t0 + Duration::from_millis(100);
        n.handle(t1 - Duration::from_millis(10), addr(1), hb("a", 1));
        n.handle(t1, addr(1), route_request("a", 2));
        assert_eq!(n.stats().suspect_parent_asking, 1);
        assert_eq!(n.parent("s"), Some("a"), "no way round");
        let tx = drain(&mut n);
        assert!(tx
            .iter()
            .any(|t| t.to == client && matches!(t.msg, Message::Withdraw { .. })));
        assert!(tx
            .iter()
            .any(|t| t.to == addr(2) && matches!(t.msg, Message::RouteRequest { .. })));
        // Asked again while suspected: nothing more.
        n.handle(
            t1 + Duration::from_millis(20),
            addr(1),
            route_request("a", 2),
        );
        assert_eq!(n.stats().suspect_parent_asking, 1);
        assert_eq!(n.stats().viewers_warned, 1);
    }

    #[test]
    fn test_viewers_stay_while_a_way_round_is_only_not_feasible_yet() {
        // b offers a path clear of a, but with an older seq than the route taken: not
        // feasible until a fresh announcement comes.
        let (mut n, t0) = with_three_neighbours("p", Role::Pop);
        let offer = |seq: u64, path: &[&str]| Message::Announce {
            server: "s".into(),
            seq,
            path: path.iter().map(|&p| p.into()).collect(),
            latency_us: 1_000,
            catalogue: vec![StreamInfo::new("news", MediaKind::Mjpeg, 25_000)],
        };
        n.handle(t0, addr(1), offer(5, &["s", "a"]));
        n.handle(t0, addr(2), offer(4, &["s", "b"]));
        assert_eq!(n.parent("s"), Some("a"));
        let news = ott_proto::stream_id_for("news");
        let client = viewer_joins(&mut n, t0, news);
        let t1 = t0 + Duration::from_millis(200);
        n.handle(t1 - Duration::from_millis(1), addr(2), hb("b", 1));
        n.handle_upstream_silent(t1, "a", news, t0);
        assert_eq!(n.stats().suspect_parents, 1);
        assert_eq!(n.parent("s"), Some("a"), "b's way is not feasible yet");
        let tx = drain(&mut n);
        assert!(
            !tx.iter().any(|t| t.to == client),
            "the viewer is not sent away"
        );
        assert_eq!(n.stats().warnings_held, 1);
        assert!(tx
            .iter()
            .any(|t| t.to == addr(2) && matches!(t.msg, Message::RouteRequest { .. })));
        // The fresh announcement the request brings: the node moves round a.
        n.handle(t1, addr(2), offer(6, &["s", "b"]));
        assert_eq!(n.parent("s"), Some("b"));
    }

    #[test]
    fn test_a_suspected_parent_without_a_way_round_makes_the_node_ask_around() {
        // b's route runs through a too (infeasible for us): the suspected parent stays,
        // and a route request goes to the neighbours, once per retry period.
        let (mut n, t0) = three_neighbours("p", Role::Pop, &["s", "a"], &["s", "a", "b"]);
        let news = ott_proto::stream_id_for("news");
        n.handle(
            t0,
            addr(3),
            Message::Join {
                stream: news,
                data_port: 7001,
                from: Some("c".into()),
            },
        );
        drain(&mut n);
        // A viewer of the stream.
        let client = viewer_joins(&mut n, t0, news);
        let t1 = t0 + Duration::from_millis(200);
        n.handle_upstream_silent(t1, "a", news, t0);
        assert_eq!(n.stats().suspect_parents, 1);
        assert_eq!(n.parent("s"), Some("a"), "no feasible way round yet");
        assert_eq!(n.stats().suspect_route_requests, 1);
        let tx = drain(&mut n);
        let asked: Vec<SocketAddr> = tx
            .iter()
            .filter(|t| matches!(t.msg, Message::RouteRequest { seq: 2, .. }))
            .map(|t| t.to)
            .collect();
        assert!(
            asked.contains(&addr(2)) && asked.contains(&addr(3)),
            "{asked:?}"
        );
        // The viewer is told at once that the path is lost, so that it moves.
        assert!(tx
            .iter()
            .any(|t| t.to == client && matches!(t.msg, Message::Withdraw { .. })));
        assert_eq!(n.stats().viewers_warned, 1);
    }

    #[test]
    fn test_a_childs_avoid_set_moves_the_stream_to_a_path_clear_of_it_and_is_passed_on() {
        let (mut n, t0) = with_three_neighbours("p", Role::Relay);
        let offer = |via: &str, mid: &str, lat: u64| Message::Announce {
            server: "s".into(),
            seq: 1,
            path: vec!["s".into(), mid.into(), via.into()],
            latency_us: lat,
            catalogue: vec![StreamInfo::new("news", MediaKind::Mjpeg, 25_000)],
        };
        n.handle(t0, addr(1), offer("a", "x", 1_000));
        n.handle(t0, addr(2), offer("b", "y", 5_000));
        assert_eq!(n.parent("s"), Some("a"));
        let news = ott_proto::stream_id_for("news");
        let join = Message::Join {
            stream: news,
            data_port: 7001,
            from: Some("c".into()),
        };
        n.handle(t0, addr(3), join.clone());
        drain(&mut n);
        assert_eq!(n.upstream(news), Some("a"));
        // An Avoid for no subscription of the sender's is ignored.
        let avoid = |set: &[&str]| Message::Avoid {
            stream: news,
            data_port: 7001,
            avoid: set.iter().map(|s| (*s).to_owned()).collect(),
        };
        let ignored = n.stats().ignored;
        n.handle(t0, SocketAddr::from(([10, 9, 9, 9], 5555)), avoid(&["x"]));
        assert_eq!(n.stats().ignored, ignored + 1);
        assert_eq!(n.upstream(news), Some("a"));
        // c asks to avoid x, which a's path goes through: the stream moves to b, which
        // is told to avoid x and us.
        n.handle(t0, addr(3), avoid(&["x"]));
        let tx = drain(&mut n);
        assert_eq!(n.upstream(news), Some("b"));
        assert_eq!(n.parent("s"), Some("a"), "the tree itself does not move");
        assert!(tx
            .iter()
            .any(|t| t.to == addr(2) && matches!(t.msg, Message::Join { .. })));
        assert!(tx
            .iter()
            .any(|t| t.to == addr(1) && matches!(t.msg, Message::Leave { .. })));
        let passed: Vec<&Message> = tx
            .iter()
            .filter(|t| t.to == addr(2) && matches!(t.msg, Message::Avoid { .. }))
            .map(|t| &t.msg)
            .collect();
        assert_eq!(passed, vec![&avoid(&["p", "x"])]);
        assert_eq!(n.stats().avoiding_upstreams, 1);
        // Refreshed with c's Joins and Avoids, it holds; a refresh of the Join alone
        // keeps the set until the join expiry, then the stream comes back to the parent.
        let t1 = t0 + Duration::from_millis(900);
        n.handle(t1, addr(3), join.clone());
        n.handle(t1, addr(3), avoid(&["x"]));
        drain(&mut n);
        assert_eq!(n.upstream(news), Some("b"));
        let expiry = NodeConfig::new("p", Role::Relay, 7001).join_expiry;
        let mut t = t1;
        while t < t1 + expiry + Duration::from_millis(100) {
            t += Duration::from_millis(500);
            for (id, a) in [("a", addr(1)), ("b", addr(2)), ("c", addr(3))] {
                n.handle(t, a, hb(id, 1));
            }
            n.handle(t, addr(1), offer("a", "x", 1_000));
            n.handle(t, addr(2), offer("b", "y", 5_000));
            n.handle(t, addr(3), join.clone());
            n.handle_timeout(t);
            drain(&mut n);
        }
        assert_eq!(n.upstream(news), Some("a"), "the avoid set expired");
    }

    #[test]
    fn test_server_seq_is_its_clock() {
        let t0 = Instant::now();
        let mut cfg = NodeConfig::new("s", Role::Server, 7001);
        cfg.incarnation = 5_000_000;
        let mut n = Node::new(cfg, vec![("p".to_owned(), addr(2))], t0, t0);
        let seqs = |n: &mut Node| -> Vec<u64> {
            drain(n)
                .into_iter()
                .filter_map(|t| match t.msg {
                    Message::Announce { seq, .. } => Some(seq),
                    _ => None,
                })
                .collect()
        };
        n.handle_timeout(t0);
        assert_eq!(seqs(&mut n), [5_000_000]);
        n.handle_timeout(t0 + Duration::from_millis(500));
        assert_eq!(seqs(&mut n), Vec::<u64>::new());
        n.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(seqs(&mut n), [6_000_000]);
        // Announcing at once twice (a new catalogue) still makes the seq grow.
        n.set_catalogue(t0 + Duration::from_secs(1), Vec::new());
        assert_eq!(seqs(&mut n), [6_000_001]);
    }

    #[test]
    fn test_announce_join_forwarding_and_garbage() {
        let (mut n, t0) = pop();
        let hb = Message::Heartbeat {
            from: "s".into(),
            seq: 1,
            sent_us: 0,
            incarnation: 1,
        };
        n.handle(t0, addr(1), hb);
        let ack = Message::HeartbeatAck {
            from: "s".into(),
            seq: 1,
            echo_us: 0,
            incarnation: 1,
        };
        n.handle(t0 + Duration::from_millis(4), addr(1), ack);
        let news = StreamInfo::new("news", MediaKind::Mjpeg, 25_000);
        let ann = Message::Announce {
            server: "s".into(),
            seq: 1,
            path: vec!["s".into()],
            latency_us: 0,
            catalogue: vec![news.clone()],
        };
        n.handle(t0 + Duration::from_millis(5), addr(1), ann);
        assert_eq!(n.parent("s"), Some("s"));
        assert_eq!(n.status().latency_ms, Some(2.0));
        drain(&mut n);
        // Garbage: announce from a stranger, bad path, looping path.
        let bad = Message::Announce {
            server: "s".into(),
            seq: 2,
            path: vec![],
            latency_us: 0,
            catalogue: vec![],
        };
        n.handle(t0, addr(1), bad.clone());
        n.handle(t0, addr(200), bad);
        assert_eq!(n.stats().malformed, 1);
        assert_eq!(n.stats().unknown_sender, 1);
        let client = SocketAddr::from(([10, 9, 9, 9], 5555));
        let now = t0 + Duration::from_millis(10);
        let data = SocketAddr::from(([10, 9, 9, 9], 9000));
        let cookie = cookie_from(&mut n, now, client, news.id, 9000);
        n.handle(
            now,
            client,
            Message::ViewerJoin {
                stream: news.id,
                data_port: 9000,
                cookie,
            },
        );
        let ev: Vec<Event> = std::iter::from_fn(|| n.poll_event()).collect();
        let key = SessionKey::derive(&[0; 32], data);
        assert!(ev.contains(&Event::Forwarding {
            stream: news.id,
            children: vec![data],
            sessions: vec![(data, key.clone())],
        }));
        let tx: Vec<ControlTransmit> = std::iter::from_fn(|| n.poll_transmit()).collect();
        assert!(tx.iter().any(|t| t.to == addr(1)
            && t.msg
                == Message::Join {
                    stream: news.id,
                    data_port: 7001,
                    from: Some("p".into())
                }));
        // The session key goes to the data address only.
        assert!(tx.iter().any(|t| t.to == data
            && t.msg
                == Message::Admitted {
                    stream: news.id,
                    data_port: 9000,
                    session_key: key.bytes(),
                }));
        assert_eq!(n.upstream(news.id), Some("s"));
        n.check_invariants().unwrap();
        // A plain Leave (no cookie) from the viewer's address is not a neighbour's: ignored.
        n.handle(
            now,
            client,
            Message::Leave {
                stream: news.id,
                data_port: 9000,
            },
        );
        assert_eq!(n.forwarding(news.id), vec![data]);
        // A Leave with a wrong cookie neither.
        n.handle(
            now,
            client,
            Message::ViewerLeave {
                stream: news.id,
                data_port: 9000,
                cookie: cookie ^ 1,
            },
        );
        assert_eq!(n.forwarding(news.id), vec![data]);
        assert_eq!(n.stats().bad_cookie, 1);
        // With the cookie, the Leave prunes at once.
        n.handle(
            now,
            client,
            Message::ViewerLeave {
                stream: news.id,
                data_port: 9000,
                cookie,
            },
        );
        let tx = drain(&mut n);
        assert!(tx.iter().any(|t| matches!(t.msg, Message::Leave { .. })));
        assert_eq!(n.upstream(news.id), None);
    }

    /// A viewer (10.9.9.9:5555, data port 9000) joins `stream` at `n` with its cookie;
    /// what `n` sends is drained. Returns the viewer's control address.
    fn viewer_joins(n: &mut Node, now: Instant, stream: StreamId) -> SocketAddr {
        let client = SocketAddr::from(([10, 9, 9, 9], 5555));
        let cookie = cookie_from(n, now, client, stream, 9000);
        n.handle(
            now,
            client,
            Message::ViewerJoin {
                stream,
                data_port: 9000,
                cookie,
            },
        );
        drain(n);
        client
    }

    /// Send a viewer's first Join from `from` and return the cookie the node sent to
    /// the data address (asserting it went there and nothing was subscribed).
    fn cookie_from(
        n: &mut Node,
        now: Instant,
        from: SocketAddr,
        stream: StreamId,
        port: u16,
    ) -> u64 {
        n.handle(
            now,
            from,
            Message::Join {
                stream,
                data_port: port,
                from: None,
            },
        );
        let data = SocketAddr::new(from.ip(), port);
        let tx = drain(n);
        tx.iter()
            .find_map(|t| match t.msg {
                Message::Cookie {
                    cookie,
                    stream: s,
                    data_port,
                } if t.to == data && s == stream && data_port == port => Some(cookie),
                _ => None,
            })
            .expect("a cookie sent to the data address")
    }

    /// A PoP with a live route to `s` offering "news" (and its id).
    fn pop_with_news() -> (Node, Instant, StreamId) {
        let (mut n, t0) = pop_of_multihomed_server();
        n.handle(t0, addr(1), announce(1_000_000, &["news"]));
        drain(&mut n);
        (n, t0, ott_proto::stream_id_for("news"))
    }

    #[test]
    fn test_viewer_without_the_cookie_gets_nothing() {
        let (mut n, t0, news) = pop_with_news();
        let victim = SocketAddr::from(([10, 9, 9, 9], 4444));
        // Joins "from" the victim (a forged source): the cookie goes to the victim, who
        // never echoes it; the forger guesses.
        n.handle(
            t0,
            victim,
            Message::Join {
                stream: news,
                data_port: 4444,
                from: None,
            },
        );
        let tx = drain(&mut n);
        assert_eq!(tx.len(), 1, "one cookie, nothing else: {tx:?}");
        assert!(matches!(tx[0].msg, Message::Cookie { .. }) && tx[0].to == victim);
        for guess in [0u64, 1, u64::MAX] {
            n.handle(
                t0,
                victim,
                Message::ViewerJoin {
                    stream: news,
                    data_port: 4444,
                    cookie: guess,
                },
            );
        }
        assert!(n.forwarding(news).is_empty());
        assert_eq!(n.upstream(news), None);
        assert_eq!(n.stats().bad_cookie, 3);
        assert!(
            std::iter::from_fn(|| n.poll_event()).all(|e| !matches!(e, Event::Forwarding { .. }))
        );
        // A cookie for another port of the same address does not admit this one.
        let other = cookie_from(&mut n, t0, victim, news, 5555);
        n.handle(
            t0,
            victim,
            Message::ViewerJoin {
                stream: news,
                data_port: 4444,
                cookie: other,
            },
        );
        assert!(n.forwarding(news).is_empty());
        assert_eq!(n.stats().bad_cookie, 4);
    }

    #[test]
    fn test_cookie_expires_after_two_buckets_and_is_renewed() {
        let (mut n, t0, news) = pop_with_news();
        // Buckets of 100 ms, so the route to s (dead after 400 ms of silence) lives on.
        n.config.cookie_bucket = Duration::from_millis(100);
        let v = SocketAddr::from(([10, 9, 9, 9], 9000));
        let c0 = cookie_from(&mut n, t0, v, news, 9000);
        let vj = |cookie| Message::ViewerJoin {
            stream: news,
            data_port: 9000,
            cookie,
        };
        // In the next bucket it is still taken, and a fresh cookie comes with the answer.
        let t1 = t0 + Duration::from_millis(110);
        n.handle(t1, v, vj(c0));
        assert_eq!(n.forwarding(news), vec![v]);
        let tx = drain(&mut n);
        let c1 = tx
            .iter()
            .find_map(|t| match t.msg {
                Message::Cookie { cookie, .. } if t.to == v => Some(cookie),
                _ => None,
            })
            .expect("a fresh cookie");
        assert_ne!(c1, c0);
        // Two buckets on, the old one is refused (and a new one sent), the fresh one taken.
        let t2 = t0 + Duration::from_millis(210);
        n.handle(t2, v, vj(c0));
        assert_eq!(n.stats().bad_cookie, 1);
        assert!(drain(&mut n)
            .iter()
            .any(|t| t.to == v && matches!(t.msg, Message::Cookie { .. })));
        n.handle(t2, v, vj(c1));
        assert_eq!(n.stats().bad_cookie, 1);
        assert_eq!(n.forwarding(news), vec![v]);
        // A viewer not refreshed expires like any child.
        n.handle_timeout(t2 + Duration::from_secs(4));
        assert!(n.forwarding(news).is_empty());
    }

    #[test]
    fn test_viewer_caps_per_stream_and_per_address() {
        let (mut n, t0, news) = pop_with_news();
        let mut cfg = n.config().clone();
        cfg.max_viewers_per_stream = 3;
        cfg.max_viewers_per_ip = 2;
        n.config = cfg;
        let admit = |n: &mut Node, ip: u8, port: u16| {
            let from = SocketAddr::from(([10, 9, 9, ip], port));
            let cookie = cookie_from(n, t0, from, news, port);
            n.handle(
                t0,
                from,
                Message::ViewerJoin {
                    stream: news,
                    data_port: port,
                    cookie,
                },
            );
            drain(n);
        };
        admit(&mut n, 1, 1000);
        admit(&mut n, 1, 1001);
        admit(&mut n, 1, 1002); // third from 10.9.9.1: refused
        assert_eq!(n.forwarding(news).len(), 2);
        assert_eq!(n.stats().viewer_cap_ip, 1);
        // A refresh of an admitted viewer is no new subscription.
        admit(&mut n, 1, 1000);
        assert_eq!(n.stats().viewer_cap_ip, 1);
        admit(&mut n, 2, 1000);
        admit(&mut n, 3, 1000); // fourth of the stream: refused
        assert_eq!(n.forwarding(news).len(), 3);
        assert_eq!(n.stats().viewer_cap_stream, 1);
    }

    #[test]
    fn test_only_pops_take_viewers_and_leave_is_a_neighbours() {
        // A relay with a route to s: a viewer's Join gets no cookie, a guessed echo nothing.
        let t0 = Instant::now();
        let cfg = NodeConfig::new("r", Role::Relay, 7001);
        let mut n = Node::new(
            cfg,
            vec![("s".into(), addr(1)), ("p".into(), addr(2))],
            t0,
            t0,
        );
        n.handle(t0, addr(1), hb("s", 5));
        n.handle(
            t0 + Duration::from_millis(2),
            addr(1),
            Message::HeartbeatAck {
                from: "s".into(),
                seq: 1,
                echo_us: 0,
                incarnation: 5,
            },
        );
        n.handle(t0, addr(1), announce(1_000_000, &["news"]));
        drain(&mut n);
        let news = ott_proto::stream_id_for("news");
        let stranger = SocketAddr::from(([10, 9, 9, 9], 4444));
        n.handle(
            t0,
            stranger,
            Message::Join {
                stream: news,
                data_port: 4444,
                from: None,
            },
        );
        n.handle(
            t0,
            stranger,
            Message::ViewerJoin {
                stream: news,
                data_port: 4444,
                cookie: viewer_cookie(&[0; 32], SocketAddr::from(([10, 9, 9, 9], 4444)), 0),
            },
        );
        assert!(drain(&mut n).is_empty());
        assert!(n.forwarding(news).is_empty());
        assert_eq!(n.stats().viewer_not_pop, 2);
        // Its neighbour p joins; a stranger's Leave naming p's data address is refused.
        n.handle(
            t0,
            addr(2),
            Message::Join {
                stream: news,
                data_port: 7001,
                from: Some("p".into()),
            },
        );
        let p_data = SocketAddr::new(addr(2).ip(), 7001);
        assert_eq!(n.forwarding(news), vec![p_data]);
        n.handle(
            t0,
            stranger,
            Message::Leave {
                stream: news,
                data_port: 7001,
            },
        );
        assert_eq!(n.forwarding(news), vec![p_data]);
        assert_eq!(n.stats().unknown_sender, 1);
        n.handle(
            t0,
            addr(2),
            Message::Leave {
                stream: news,
                data_port: 7001,
            },
        );
        assert!(n.forwarding(news).is_empty());
    }
}
