//! The viewer's side of the overlay: which PoP to attach to, and which stream to watch
//! there (SPEC §6).
//!
//! A [`Client`] probes every PoP it was given, measures each one's round-trip time and
//! loss from the replies it gets, scores it together with the PoP's own latency to the
//! server, attaches to the best one with hysteresis, asks it for the stream catalogue and
//! joins the selected stream there. When the PoP degrades or dies it moves to the next
//! best, joining there at once and leaving the old one [`ClientConfig::leave_after`]
//! later (make-before-break: a lost `Join` or a PoP that must first subscribe upstream
//! costs no outage while the old PoP still delivers).
//!
//! Like the rest of this crate it is **sans-IO**: it never touches a socket, a thread or
//! the clock. The caller passes `now` in, feeds it decoded control messages with
//! [`Client::handle`], calls [`Client::handle_timeout`] when [`Client::poll_timeout`] is
//! due, and sends what [`Client::poll_transmit`] yields.
//!
//! **Drain rule:** after [`Client::new`] and after every `handle*`, [`Client::select_stream`]
//! or [`Client::shutdown`] call, drain [`Client::poll_transmit`] and [`Client::poll_event`],
//! then read [`Client::poll_timeout`].
//!
//! It does not receive media: the application owns the data socket and drops every
//! datagram whose stream id is not that of the last [`ClientEvent::Watching`].
//!
//! Wire timestamps are microseconds since the client's own `epoch`; probe replies echo
//! them back, so no two hosts' clocks are ever compared.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use ott_proto::Message;
//! use ott_tree::client::{Client, ClientConfig, ClientEvent};
//!
//! let epoch = Instant::now();
//! let pop: std::net::SocketAddr = "127.0.0.1:7000".parse().unwrap();
//! let mut client = Client::new(ClientConfig::default(), vec![("n5".into(), pop)], 9000, epoch, epoch);
//! // The first probe round goes out at once.
//! let probe = client.poll_transmit().unwrap();
//! let Message::Probe { nonce, sent_us } = probe.msg else { panic!("a probe") };
//! // The PoP answers 10 ms later: the client attaches and asks for the catalogue.
//! let now = epoch + Duration::from_millis(10);
//! client.handle(now, pop, Message::ProbeReply {
//!     nonce, echo_us: sent_us, pop: "n5".into(), path_latency_us: Some(2_000), hops: 2, viewers: 0, path: vec![],
//! });
//! assert_eq!(client.pop(), Some("n5"));
//! assert!(matches!(client.poll_event(), Some(ClientEvent::PopChanged { old: None, .. })));
//! assert_eq!(client.poll_transmit().unwrap().msg, Message::ListStreams);
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ott_overlay::PeerAddrs;
use ott_proto::auth::SessionKey;
use ott_proto::{Message, StreamInfo};
use serde::Serialize;

/// Probe loss up to this fraction of the window is not held against a PoP.
pub const LOSS_FREE: f64 = 0.25;

/// The loss of a PoP with fewer probes resolved is counted as a fraction of this many
/// (see `loss`): until then the probes to come are taken as answered.
const LOSS_EARLY_PROBES: usize = 8;

/// A second path that is still not disjoint from the first this long after it was
/// taken (its PoP had the time to move the stream off the first path's nodes, and to
/// say so in a probe reply) is traded for another PoP not tried yet.
const SECOND_TRIAL: Duration = Duration::from_secs(3);

/// An unanswered `Join` is repeated after twice the PoP's RTT plus this ...
const QUICK_RETRY_SLACK: Duration = Duration::from_millis(10);
/// ... and not sooner than this (see `Client::quick_retry`).
const QUICK_RETRY_MIN: Duration = Duration::from_millis(20);

/// Shortest period accepted in a [`ClientConfig`].
const MIN_PERIOD: Duration = Duration::from_millis(1);

/// A control message to send, the same type as the overlay's: the caller encodes `msg`
/// with [`ott_proto::encode`] and sends it to `to`.
pub use ott_overlay::ControlTransmit;

/// Tuning of a [`Client`]. [`Default`] gives the values of SPEC §6.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    /// Every PoP is probed this often (default 1 s); the first round goes out at once.
    pub probe_interval: Duration,
    /// A probe unanswered after this long counts as lost (default 1 s).
    pub probe_timeout: Duration,
    /// The `Join` of the watched stream is repeated this often (default 500 ms): the PoP
    /// holds subscriptions as soft state (3.5 s), and seven refreshes per expiry keep
    /// one under loss.
    pub join_refresh: Duration,
    /// Until the current PoP confirms the watched stream with `Admitted`, the `Join` is
    /// repeated this often instead (default 200 ms): a lost `Join`, `Cookie` or echo costs
    /// one retry, not a refresh period, which matters most right after a PoP change.
    pub join_retry: Duration,
    /// Loss is the fraction of the last `loss_window` probes that were lost (default
    /// 20). Loss up to [`LOSS_FREE`] costs a PoP nothing, so that one lost probe under
    /// a few percent of random loss does not move the client.
    pub loss_window: usize,
    /// Another PoP must score at least this fraction better than the current one before
    /// the client moves (default 0.2, i.e. 20 %).
    pub switch_margin: f64,
    /// ... and by at least this much (default 1 ms), so that microsecond noise on a
    /// fast network (loopback, a LAN) does not make the client hop between PoPs.
    pub switch_margin_abs: Duration,
    /// ... and by at least this many times the sum of the two PoPs' measured spreads
    /// (the smoothed difference between successive samples of each one's score), so
    /// that jitter on the paths does not make the client hop between PoPs either
    /// (default 2: 0.5 instead of 2.5 switches a minute under ±20 ms of jitter in the
    /// seed emulation; 0 turns it off). It was off while the tree's own spread was
    /// measured against a lagging mean: the PoPs it keeps route the stream through
    /// relays whose spread was overstated, and a real 20 ms change took 5.7 s to move
    /// the tree (`tests/stability.rs`).
    pub switch_spread: f64,
    /// `ListStreams` is repeated this often until a `Streams` answer arrives (default 300 ms).
    pub request_retry: Duration,
    /// The catalogue is asked for again this often once known (default 5 s).
    pub catalogue_refresh: Duration,
    /// A PoP whose last this-many probes in a row were lost is unusable (default 3).
    pub max_lost_in_a_row: u32,
    /// While watching, when no media arrived for this long (see
    /// [`Client::media_received`]), every PoP is probed at once (default 200 ms), and
    /// again after each further such period of silence.
    pub media_silence: Duration,
    /// A probe sent because of media silence is lost after this long (default 150 ms);
    /// if the current PoP does not answer two such probes in a row (media still
    /// silent), that PoP is unusable and the client moves to the next best.
    pub urgent_probe_timeout: Duration,
    /// After moving to another PoP, the old one is left this much later (default 2 s,
    /// two `Join` refreshes): make before break. The stream keeps coming from the old PoP
    /// (the application drops the duplicates) until the new one delivers, also when the
    /// first `Join` there was lost or the new PoP first has to subscribe upstream. Zero
    /// leaves the old PoP at once.
    pub leave_after: Duration,
    /// Seed of the nonce generator, so that a run can be replayed.
    pub seed: u64,
    /// Paths to receive the stream over (default 1; at most 2). With 2, the client
    /// also joins the watched stream at a second PoP, chosen so that its tree path from
    /// the server shares no node with the current PoP's where such a PoP is usable
    /// (else the best other PoP), and the application keeps the first copy of each
    /// datagram (SMPTE ST 2022-7 style). A second PoP that becomes unusable, or that is
    /// not disjoint while a disjoint one is usable, is replaced in the background; when
    /// the current PoP fails the second one takes its place at once.
    pub paths: u8,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(1),
            join_refresh: Duration::from_millis(500),
            join_retry: Duration::from_millis(200),
            loss_window: 20,
            switch_margin: 0.2,
            switch_margin_abs: Duration::from_millis(1),
            switch_spread: 2.0,
            request_retry: Duration::from_millis(300),
            catalogue_refresh: Duration::from_secs(5),
            max_lost_in_a_row: 3,
            media_silence: Duration::from_millis(200),
            urgent_probe_timeout: Duration::from_millis(150),
            leave_after: Duration::from_secs(2),
            seed: 0x07c1_1e47,
            paths: 1,
        }
    }
}

/// Something the application should know about, from [`Client::poll_event`].
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// The client attached to a PoP (`old` is `None` the first time).
    PopChanged {
        /// The PoP left, if any.
        old: Option<String>,
        /// The PoP now in use.
        new: String,
    },
    /// The catalogue arrived or changed.
    Catalogue(Vec<StreamInfo>),
    /// The client now watches this stream: from here on, only datagrams with its id are
    /// to be played.
    Watching(StreamInfo),
    /// The selected stream name is not in the catalogue (reported once per selection).
    UnknownStream(String),
    /// No PoP is usable at the moment (reported once until one is usable again).
    NoPop,
    /// A PoP refused a request, with its reason.
    Refused(String),
    /// PoP `pop` admitted us: the media it sends carries tags made with `key`. The
    /// application writes only media whose tag verifies with the key of a PoP it
    /// was admitted at (during a PoP switch, both send).
    Session {
        /// The PoP's node id.
        pop: String,
        /// The session key.
        key: SessionKey,
    },
}

/// Counters of what the client ignored, for logs and `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClientStats {
    /// Probes sent.
    pub probes_sent: u64,
    /// Probes that got no reply within the probe timeout.
    pub probes_lost: u64,
    /// Messages from an address that is none of the addresses the bootstrapper gave
    /// for any PoP.
    pub unknown_sender: u64,
    /// Messages a PoP should not send to a client (heartbeats, announcements, joins ...).
    pub unexpected: u64,
    /// Probe replies matching no outstanding probe (late, duplicated or forged).
    pub stale_replies: u64,
    /// `ListStreams` requests sent, retries included.
    pub list_requests: u64,
}

/// The state of one PoP as the client sees it, part of [`ClientStatus`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PopStatus {
    /// The PoP's node id.
    pub id: String,
    /// Smoothed round-trip time, ms; `None` before the first reply.
    pub rtt_ms: Option<f64>,
    /// Fraction of the recent probes that were lost, 0..=1.
    pub loss: f64,
    /// The PoP's latency to the server from its last reply, ms; `None` without a path.
    pub path_latency_ms: Option<f64>,
    /// The score (lower is better), ms; `None` when unusable.
    pub score: Option<f64>,
    /// Whether the client would attach to it.
    pub usable: bool,
    /// The PoP's tree path from its server, node ids inclusive, from its last reply
    /// (empty when unknown).
    pub path: Vec<String>,
}

/// One path the watched stream comes over, part of [`ClientStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PathStatus {
    /// The PoP the stream is joined at.
    pub pop: String,
    /// Its tree path from the server, node ids inclusive (empty when unknown).
    pub path: Vec<String>,
    /// Whether the PoP admitted us for the watched stream since the last join.
    pub admitted: bool,
}

/// A snapshot of the client for `/status` (serialises to JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientStatus {
    /// The PoP in use.
    pub pop: Option<String>,
    /// The stream watched.
    pub stream: Option<String>,
    /// Number of PoP changes after the first choice.
    pub pop_switches: u64,
    /// Every PoP, in the order given to [`Client::new`].
    pub pops: Vec<PopStatus>,
    /// Paths configured ([`ClientConfig::paths`]).
    pub paths_wanted: u8,
    /// The paths the watched stream is joined over: the current PoP's first, then the
    /// second PoP's with `--paths 2` (empty when not watching).
    pub paths: Vec<PathStatus>,
    /// Whether the two paths share no node but their server: `None` with fewer than
    /// two paths or when a path is unknown.
    pub disjoint: Option<bool>,
    /// What was ignored.
    pub stats: ClientStats,
}

#[derive(Debug)]
struct Pop {
    id: String,
    /// Where requests go (the PoP's address on the way from this client).
    addr: SocketAddr,
    /// Every address of the PoP: a message from any of them is the PoP's.
    addrs: PeerAddrs,
    srtt: Option<Duration>,
    /// Mean deviation of the score's base (RTT plus path latency) over the replies, µs.
    dev_us: f64,
    path_latency_us: Option<u64>,
    /// Outcomes of the last `loss_window` resolved probes, `true` = answered.
    history: VecDeque<bool>,
    lost_in_a_row: u32,
    /// An urgent probe (on media silence) to it was lost, and no reply or media since.
    urgent_lost: bool,
    /// The PoP's latest cookie for our data address.
    cookie: Option<u64>,
    /// The session key the PoP tags our media with.
    session: Option<[u8; 32]>,
    /// Its tree path from its server, from its last probe reply (empty: unknown).
    path: Vec<String>,
}

#[derive(Debug)]
struct Pending {
    nonce: u64,
    pop: usize,
    sent_at: Instant,
    sent_us: u64,
    /// When it counts as lost.
    deadline: Instant,
    /// Sent because media went silent.
    urgent: bool,
}

/// The viewer's PoP choice and stream selection, as a sans-IO state machine.
///
/// See the [module documentation](self) for the calling contract.
#[derive(Debug)]
pub struct Client {
    config: ClientConfig,
    epoch: Instant,
    data_port: u16,
    rng: fastrand::Rng,
    pops: Vec<Pop>,
    pending: Vec<Pending>,
    current: Option<usize>,
    no_pop_reported: bool,
    catalogue: Vec<StreamInfo>,
    catalogue_known: bool,
    wanted: Option<String>,
    unknown_reported: bool,
    watching: Option<StreamInfo>,
    next_probe: Instant,
    next_list: Option<Instant>,
    next_join: Option<Instant>,
    /// The current PoP confirmed the watched stream (`Admitted`) since the last join.
    admitted: bool,
    /// The PoP of the second path (`paths` = 2), never the current one.
    second: Option<usize>,
    /// The second PoP confirmed the watched stream since its last join.
    second_admitted: bool,
    /// When the watched stream's `Join` to the second PoP is due.
    next_join2: Option<Instant>,
    /// When the second PoP was taken.
    second_since: Option<Instant>,
    /// PoPs tried as the second path with the current first one, which never became
    /// disjoint from it.
    tried: Vec<usize>,
    /// The current PoP the `tried` list is about.
    tried_for: Option<usize>,
    /// The one of the two PoPs that is asked to `Avoid` the other's path: the second
    /// at first; the first when every second PoP was tried and none got round the
    /// first path (its own path may have a way round). It keeps the part when it
    /// becomes the first PoP (its path is the one that was moved: leaving it would
    /// bring both paths together again).
    avoider: Option<usize>,
    /// When the last media datagram of the watched stream arrived.
    last_media: Option<Instant>,
    /// Since when media is silent, once the silence was reported (logged once per
    /// outage, and its length when media comes back).
    silent_since: Option<Instant>,
    /// No urgent probe round before this.
    urgent_not_before: Instant,
    /// PoPs moved away from, to leave (PoP, stream) at the given time.
    leaving: Vec<(Instant, usize, StreamInfo)>,
    shut_down: bool,
    pop_switches: u64,
    stats: ClientStats,
    transmits: VecDeque<ControlTransmit>,
    events: VecDeque<ClientEvent>,
}

impl Client {
    /// A client that will choose among `pops` (id and control address, each PoP with a
    /// single address) and ask for media at `data_port` of its own address. See
    /// [`Client::with_pops`] for PoPs with several addresses.
    ///
    /// `epoch` is the origin of the client's wire timestamps; `now` is the current time.
    /// The first probe round is queued at once: drain [`Client::poll_transmit`].
    /// Periods shorter than 1 ms in `config` are raised to 1 ms, so that no setting can
    /// make the client spin.
    pub fn new(
        config: ClientConfig,
        pops: Vec<(String, SocketAddr)>,
        data_port: u16,
        epoch: Instant,
        now: Instant,
    ) -> Self {
        let pops = pops.into_iter().map(PeerAddrs::from).collect();
        Self::with_pops(config, pops, data_port, epoch, now)
    }

    /// A client that will choose among `pops` as the bootstrapper gave them
    /// ([`PeerAddrs`]): each PoP's id, the control address to send to, and every
    /// control address it may answer from; messages from any other address are
    /// ignored. Otherwise as [`Client::new`].
    pub fn with_pops(
        mut config: ClientConfig,
        pops: Vec<PeerAddrs>,
        data_port: u16,
        epoch: Instant,
        now: Instant,
    ) -> Self {
        for d in [
            &mut config.probe_interval,
            &mut config.probe_timeout,
            &mut config.join_refresh,
            &mut config.request_retry,
            &mut config.catalogue_refresh,
            &mut config.media_silence,
            &mut config.urgent_probe_timeout,
        ] {
            *d = (*d).max(MIN_PERIOD);
        }
        config.loss_window = config.loss_window.max(1);
        config.paths = config.paths.clamp(1, 2);
        let rng = fastrand::Rng::with_seed(config.seed);
        let pops = pops
            .into_iter()
            .map(|addrs: PeerAddrs| Pop {
                id: addrs.id.clone(),
                addr: addrs.preferred,
                addrs,
                srtt: None,
                dev_us: 0.0,
                path_latency_us: None,
                history: VecDeque::new(),
                lost_in_a_row: 0,
                urgent_lost: false,
                cookie: None,
                session: None,
                path: Vec::new(),
            })
            .collect();
        let mut client = Self {
            config,
            epoch,
            data_port,
            rng,
            pops,
            pending: Vec::new(),
            current: None,
            no_pop_reported: false,
            catalogue: Vec::new(),
            catalogue_known: false,
            wanted: None,
            unknown_reported: false,
            watching: None,
            next_probe: now,
            next_list: None,
            next_join: None,
            admitted: false,
            second: None,
            second_admitted: false,
            next_join2: None,
            second_since: None,
            tried: Vec::new(),
            tried_for: None,
            avoider: None,
            last_media: None,
            silent_since: None,
            urgent_not_before: now,
            leaving: Vec::new(),
            shut_down: false,
            pop_switches: 0,
            stats: ClientStats::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        };
        client.handle_timeout(now);
        client
    }

    /// Select the stream to watch, by name.
    ///
    /// The name is remembered: the client joins it at its PoP as soon as the catalogue
    /// holds it, or reports [`ClientEvent::UnknownStream`] once if the known catalogue
    /// does not. When another stream is being watched, the client sends `Leave` for the
    /// old one, then `Join` for the new one, and emits [`ClientEvent::Watching`]: from
    /// then on the application drops every datagram not of the new stream's id.
    pub fn select_stream(&mut self, now: Instant, name: &str) {
        if self.shut_down {
            return;
        }
        if self.watching.as_ref().is_some_and(|s| s.name == name) {
            self.wanted = Some(name.to_owned());
            return;
        }
        self.wanted = Some(name.to_owned());
        self.unknown_reported = false;
        self.resolve_wanted(now);
    }

    /// Feed one decoded control message received from `from` at `now`.
    ///
    /// Never panics. Messages from an address that is none of a PoP's (any of the
    /// addresses the bootstrapper gave for it counts) are ignored and counted in
    /// [`ClientStats::unknown_sender`]; messages a PoP has no reason to send, and
    /// replies to no outstanding probe, are ignored and counted too.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, msg: Message) {
        if self.shut_down {
            return;
        }
        let idx = self
            .pops
            .iter()
            .position(|p| p.addr == from)
            .or_else(|| self.pops.iter().position(|p| p.addrs.owns(from)));
        let Some(idx) = idx else {
            self.stats.unknown_sender += 1;
            tracing::debug!(%from, kind = msg.kind(), "message from an unknown sender ignored");
            return;
        };
        match msg {
            Message::ProbeReply {
                nonce,
                echo_us,
                path_latency_us,
                path,
                ..
            } => self.on_probe_reply(now, idx, nonce, echo_us, path_latency_us, path),
            Message::Streams { streams } => self.on_streams(now, idx, streams),
            Message::Cookie {
                stream,
                data_port,
                cookie,
            } => self.on_cookie(now, idx, stream, data_port, cookie),
            Message::Admitted {
                stream,
                data_port,
                session_key,
            } => {
                if data_port != self.data_port {
                    self.stats.unexpected += 1;
                    return;
                }
                if self.watching.as_ref().is_some_and(|s| s.id == stream) {
                    if self.current == Some(idx) {
                        self.admitted = true;
                    } else if self.second == Some(idx) {
                        self.second_admitted = true;
                    }
                }
                if self.pops[idx].session != Some(session_key) {
                    self.pops[idx].session = Some(session_key);
                    self.events.push_back(ClientEvent::Session {
                        pop: self.pops[idx].id.clone(),
                        key: SessionKey::from_bytes(session_key),
                    });
                }
            }
            Message::Withdraw { .. } => {
                // The PoP lost every path to the stream: it is unusable until a probe
                // reply says otherwise.
                tracing::info!(pop = %self.pops[idx].id, "pop lost its path");
                self.pops[idx].path_latency_us = None;
                self.evaluate(now);
            }
            Message::Error { reason } => {
                tracing::info!(pop = %self.pops[idx].id, %reason, "request refused");
                self.events.push_back(ClientEvent::Refused(reason));
            }
            other => {
                self.stats.unexpected += 1;
                tracing::debug!(%from, kind = other.kind(), "unexpected message ignored");
            }
        }
    }

    /// Tell the client that a media datagram of the watched stream arrived at `now`.
    ///
    /// The application calls it for every datagram it plays (it is cheap). When media
    /// stops for [`ClientConfig::media_silence`] while watching, the client probes every
    /// PoP at once instead of waiting for the next round, and leaves a PoP that does not
    /// answer two such probes in a row within [`ClientConfig::urgent_probe_timeout`]
    /// or has lost its path. Changes [`Client::poll_timeout`].
    pub fn media_received(&mut self, now: Instant) {
        if self.watching.is_some() {
            self.last_media = Some(now);
            if let Some(t) = self.silent_since.take() {
                let ms = now.saturating_duration_since(t).as_millis() as u64;
                tracing::info!(silent_ms = ms, "media back after a silence");
            }
            if let Some(c) = self.current.filter(|_| self.config.paths == 1) {
                // Media from it: the PoP is alive, whatever probes were lost. (Over two
                // paths the media may come from the other PoP only: probes decide.)
                self.pops[c].urgent_lost = false;
                self.pops[c].lost_in_a_row = 0;
            }
        }
    }

    /// When media silence is to be acted on, if watching and media was flowing.
    fn silence_deadline(&self) -> Option<Instant> {
        self.current?;
        self.watching.as_ref()?;
        let t = later(self.last_media?, self.config.media_silence);
        Some(t.max(self.urgent_not_before))
    }

    /// Advance the timers to `now`: resolve unanswered probes as lost, send the probe
    /// round, `ListStreams` retries, `Join` refreshes and `Leave`s of PoPs moved away
    /// from that are due, probe at once on
    /// media silence, and move to another PoP if the current one became unusable.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.shut_down {
            return;
        }
        self.expire_probes(now);
        if self.silence_deadline().is_some_and(|t| now >= t) {
            if self.silent_since.is_none() {
                self.silent_since = self.last_media;
                tracing::info!(
                    pop = %self.pop().unwrap_or("none"),
                    "media silent: probing every PoP at once"
                );
            }
            self.probe_all(now, true);
            self.urgent_not_before = later(now, self.config.media_silence);
        }
        if now >= self.next_probe {
            self.probe_all(now, false);
            let next = later(self.next_probe, self.config.probe_interval);
            self.next_probe = if next > now {
                next
            } else {
                later(now, self.config.probe_interval)
            };
        }
        if self.next_list.is_some_and(|t| now >= t) {
            self.send_list(now);
        }
        self.send_leaves(|t| t <= now);
        if self.next_join.is_some_and(|t| now >= t) {
            if let (Some(cur), Some(stream)) = (self.current, self.watching.clone()) {
                self.join_first(cur, &stream);
                self.next_join = Some(later(now, self.join_interval()));
            } else {
                self.next_join = None;
            }
        }
        if self.next_join2.is_some_and(|t| now >= t) {
            if let (Some(second), Some(stream)) = (self.second, self.watching.clone()) {
                self.join_second(second, &stream);
                self.next_join2 = Some(later(now, self.join2_interval()));
            } else {
                self.next_join2 = None;
            }
        }
        self.evaluate(now);
    }

    /// Leave the watched stream at the current PoP (and at PoPs it moved away from and
    /// has not left yet) and stop: afterwards the client sends
    /// nothing more, ignores its inputs and has no timeout.
    pub fn shutdown(&mut self, _now: Instant) {
        if self.shut_down {
            return;
        }
        self.send_leaves(|_| true);
        if let Some(stream) = self.watching.as_ref() {
            for p in self.current.into_iter().chain(self.second) {
                let msg = self.leave_msg(p, stream);
                self.transmits.push_back(ControlTransmit {
                    to: self.pops[p].addr,
                    msg,
                });
            }
        }
        self.shut_down = true;
        self.pending.clear();
    }

    /// The next message to send, if any. Changes after `new`, every `handle*`,
    /// `select_stream` and `shutdown`.
    pub fn poll_transmit(&mut self) -> Option<ControlTransmit> {
        self.transmits.pop_front()
    }

    /// The next event for the application, if any. Changes after every `handle*` and
    /// `select_stream`.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// When [`Client::handle_timeout`] must be called next; `None` after
    /// [`Client::shutdown`]. Changes after `new`, every `handle*`, `select_stream` and
    /// `shutdown`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.shut_down {
            return None;
        }
        let probes = self.pending.iter().map(|p| p.deadline);
        std::iter::once(self.next_probe)
            .chain(probes)
            .chain(self.next_list)
            .chain(self.next_join)
            .chain(self.next_join2)
            .chain(self.leaving.iter().map(|l| l.0))
            .chain(self.silence_deadline())
            .min()
    }

    /// The stream catalogue last received from a PoP (empty before the first answer).
    pub fn catalogue(&self) -> &[StreamInfo] {
        &self.catalogue
    }

    /// Id of the PoP in use.
    pub fn pop(&self) -> Option<&str> {
        self.current.map(|i| self.pops[i].id.as_str())
    }

    /// The stream being watched.
    pub fn stream(&self) -> Option<&StreamInfo> {
        self.watching.as_ref()
    }

    /// Number of PoP changes after the first choice.
    pub fn pop_switches(&self) -> u64 {
        self.pop_switches
    }

    /// Counters of what was sent, lost and ignored.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// A snapshot for `/status`.
    pub fn status(&self) -> ClientStatus {
        let pops = self
            .pops
            .iter()
            .map(|p| {
                let score = self.score(p);
                PopStatus {
                    id: p.id.clone(),
                    rtt_ms: p.srtt.map(|d| d.as_secs_f64() * 1e3),
                    loss: loss(p, self.config.loss_window),
                    path_latency_ms: p.path_latency_us.map(|us| us as f64 / 1e3),
                    score: score.map(|s| s / 1e3),
                    usable: score.is_some(),
                    path: p.path.clone(),
                }
            })
            .collect();
        let paths: Vec<PathStatus> = if self.watching.is_some() {
            let cur = self.current.map(|c| (c, self.admitted));
            let second = self.second.map(|s| (s, self.second_admitted));
            cur.into_iter()
                .chain(second)
                .map(|(i, admitted)| PathStatus {
                    pop: self.pops[i].id.clone(),
                    path: self.pops[i].path.clone(),
                    admitted,
                })
                .collect()
        } else {
            Vec::new()
        };
        let disjoint = match (self.current, self.second) {
            (Some(c), Some(s)) if self.watching.is_some() => {
                disjoint(&self.pops[c].path, &self.pops[s].path)
            }
            _ => None,
        };
        ClientStatus {
            pop: self.pop().map(str::to_owned),
            stream: self.watching.as_ref().map(|s| s.name.clone()),
            pop_switches: self.pop_switches,
            pops,
            paths_wanted: self.config.paths,
            paths,
            disjoint,
            stats: self.stats.clone(),
        }
    }

    // ----- inputs -----

    fn on_probe_reply(
        &mut self,
        now: Instant,
        idx: usize,
        nonce: u64,
        echo_us: u64,
        path_latency_us: Option<u64>,
        path: Vec<String>,
    ) {
        let Some(pos) = self
            .pending
            .iter()
            .position(|p| p.nonce == nonce && p.pop == idx && p.sent_us == echo_us)
        else {
            self.stats.stale_replies += 1;
            tracing::debug!(pop = %self.pops[idx].id, nonce, "stale probe reply ignored");
            return;
        };
        let probe = self.pending.swap_remove(pos);
        // RTT from the echoed timestamp, which is our own clock: `sent_at` is exactly
        // `epoch + echo_us` rounded to the microsecond.
        let sample = now.saturating_duration_since(probe.sent_at);
        let window = self.config.loss_window;
        let pop = &mut self.pops[idx];
        let inst = sample.as_secs_f64() * 1e6 + path_latency_us.unwrap_or(0) as f64;
        if let Some(s) = pop.srtt {
            let prev = s.as_secs_f64() * 1e6 + pop.path_latency_us.unwrap_or(0) as f64;
            pop.dev_us = (pop.dev_us * 3.0 + (inst - prev).abs()) / 4.0;
        }
        pop.srtt = Some(match pop.srtt {
            None => sample,
            // EWMA with gain 1/4: a few probes follow a real change of the path.
            Some(s) => (s * 3 + sample) / 4,
        });
        pop.path_latency_us = path_latency_us;
        pop.path = path;
        pop.lost_in_a_row = 0;
        pop.urgent_lost = false;
        push_outcome(&mut pop.history, window, true);
        tracing::debug!(pop = %pop.id, rtt_us = sample.as_micros() as u64, ?path_latency_us, "probe reply");
        self.evaluate(now);
    }

    fn on_streams(&mut self, now: Instant, idx: usize, streams: Vec<StreamInfo>) {
        if Some(idx) != self.current {
            // An answer from a PoP we left (or never asked): the current one will answer.
            self.stats.unexpected += 1;
            return;
        }
        self.next_list = Some(later(now, self.config.catalogue_refresh));
        let changed = !self.catalogue_known || streams != self.catalogue;
        self.catalogue_known = true;
        if changed {
            self.catalogue = streams;
            self.events
                .push_back(ClientEvent::Catalogue(self.catalogue.clone()));
        }
        self.resolve_wanted(now);
    }

    // ----- timers -----

    /// Probe every PoP; `urgent` probes (on media silence) have the short timeout.
    fn probe_all(&mut self, now: Instant, urgent: bool) {
        let sent_us = u64::try_from(now.saturating_duration_since(self.epoch).as_micros())
            .unwrap_or(u64::MAX);
        let timeout = if urgent {
            self.config.urgent_probe_timeout
        } else {
            self.config.probe_timeout
        };
        for idx in 0..self.pops.len() {
            let nonce = self.rng.u64(..);
            self.pending.push(Pending {
                nonce,
                pop: idx,
                sent_at: now,
                sent_us,
                deadline: later(now, timeout),
                urgent,
            });
            self.stats.probes_sent += 1;
            self.transmits.push_back(ControlTransmit {
                to: self.pops[idx].addr,
                msg: Message::Probe { nonce, sent_us },
            });
        }
    }

    fn expire_probes(&mut self, now: Instant) {
        let window = self.config.loss_window;
        let max_lost = self.config.max_lost_in_a_row.max(1);
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].deadline <= now {
                let probe = self.pending.swap_remove(i);
                self.stats.probes_lost += 1;
                let current = self.current == Some(probe.pop);
                let pop = &mut self.pops[probe.pop];
                pop.lost_in_a_row = pop.lost_in_a_row.saturating_add(1);
                if probe.urgent && current {
                    // Media stopped and the PoP is silent too: one more such probe
                    // lost and we leave it (one alone may be random loss).
                    pop.lost_in_a_row = pop.lost_in_a_row.max(max_lost - 1);
                    if pop.urgent_lost {
                        pop.lost_in_a_row = max_lost;
                    }
                    pop.urgent_lost = true;
                }
                push_outcome(&mut pop.history, window, false);
                tracing::debug!(pop = %pop.id, lost_in_a_row = pop.lost_in_a_row, "probe lost");
            } else {
                i += 1;
            }
        }
    }

    fn send_list(&mut self, now: Instant) {
        let Some(cur) = self.current else {
            self.next_list = None;
            return;
        };
        self.stats.list_requests += 1;
        self.transmits.push_back(ControlTransmit {
            to: self.pops[cur].addr,
            msg: Message::ListStreams,
        });
        self.next_list = Some(later(now, self.config.request_retry));
    }

    // ----- decisions -----

    /// Score of a PoP in µs (lower is better), `None` when unusable.
    fn score(&self, p: &Pop) -> Option<f64> {
        let rtt = p.srtt?;
        let path = p.path_latency_us?;
        if p.lost_in_a_row >= self.config.max_lost_in_a_row.max(1) {
            return None;
        }
        let window = self.config.loss_window;
        if p.history.len() >= window && p.history.iter().all(|ok| !ok) {
            return None;
        }
        let base = rtt.as_secs_f64() * 1e6 + path as f64;
        Some(base * (1.0 + 4.0 * (loss(p, window) - LOSS_FREE).max(0.0)))
    }

    /// Choose the current PoP and, over two paths, the second one.
    fn evaluate(&mut self, now: Instant) {
        self.evaluate_current(now);
        if self.config.paths > 1 {
            self.choose_second(now);
        }
    }

    fn evaluate_current(&mut self, now: Instant) {
        let best = self
            .pops
            .iter()
            .enumerate()
            .filter_map(|(i, p)| self.score(p).map(|s| (i, s)))
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        let current_score = self.current.and_then(|c| self.score(&self.pops[c]));
        match (best, self.current, current_score) {
            (None, _, _) => {
                // Before any probe had the time to be answered or lost, there is
                // nothing to report yet.
                let measured = self.pops.is_empty()
                    || self.current.is_some()
                    || self.pops.iter().any(|p| !p.history.is_empty());
                if measured && !self.no_pop_reported {
                    self.no_pop_reported = true;
                    tracing::debug!("no usable pop");
                    self.events.push_back(ClientEvent::NoPop);
                }
            }
            (Some((b, _)), None, _) | (Some((b, _)), Some(_), None) => {
                self.no_pop_reported = false;
                self.switch_to(now, b);
            }
            (Some((b, bs)), Some(c), Some(cs)) => {
                self.no_pop_reported = false;
                let spread = self.config.switch_spread.max(0.0)
                    * (self.pops[b].dev_us + self.pops[c].dev_us);
                let abs = (self.config.switch_margin_abs.as_secs_f64() * 1e6).max(spread);
                if b != c && bs < cs * (1.0 - self.config.switch_margin) && cs - bs >= abs {
                    self.switch_to(now, b);
                }
            }
        }
    }

    fn switch_to(&mut self, now: Instant, new: usize) {
        let old = self.current;
        if old == Some(new) {
            return;
        }
        self.current = Some(new);
        let new_addr = self.pops[new].addr;
        if self.second == Some(new) {
            // The second path becomes the first: it is joined (and maybe admitted)
            // already, so nothing is lost while a new second path is found.
            self.second = None;
            let admitted = std::mem::take(&mut self.second_admitted);
            if let Some(stream) = &self.watching {
                self.leaving.retain(|l| l.1 != new);
                if let Some(o) = old {
                    self.leaving
                        .push((later(now, self.config.leave_after), o, stream.clone()));
                }
                self.admitted = admitted;
                self.next_join = self.next_join2.take();
                if self.next_join.is_none() {
                    self.next_join = Some(later(now, self.join_interval()));
                }
            }
            self.next_join2 = None;
            self.pop_switches += 1;
            self.urgent_not_before = later(now, self.config.media_silence);
            let old_id = old.map(|o| self.pops[o].id.clone());
            let new_id = self.pops[new].id.clone();
            tracing::info!(old = %old_id.as_deref().unwrap_or("none"), new = %new_id, "pop changed to the second path's");
            self.events.push_back(ClientEvent::PopChanged {
                old: old_id,
                new: new_id,
            });
            self.next_list = Some(later(now, self.config.catalogue_refresh));
            return;
        }
        if let Some(stream) = &self.watching {
            // Make before break: join at the new PoP, leave the old one `leave_after`
            // later (unless we come back to it before).
            let join = self.join_msg(new, stream);
            self.transmits.push_back(ControlTransmit {
                to: new_addr,
                msg: join,
            });
            let stream = stream.clone();
            self.admitted = false;
            self.leaving.retain(|l| l.1 != new);
            if let Some(o) = old {
                self.leaving
                    .push((later(now, self.config.leave_after), o, stream));
                if self.config.leave_after.is_zero() {
                    self.send_leaves(|_| true);
                }
            }
            self.next_join = Some(later(now, self.join_interval()));
        }
        if old.is_some() {
            self.pop_switches += 1;
        }
        // Give the new PoP a period of silence to deliver before acting on it.
        self.urgent_not_before = later(now, self.config.media_silence);
        let old_id = old.map(|o| self.pops[o].id.clone());
        let new_id = self.pops[new].id.clone();
        tracing::info!(old = %old_id.as_deref().unwrap_or("none"), new = %new_id, "pop changed");
        self.events.push_back(ClientEvent::PopChanged {
            old: old_id,
            new: new_id,
        });
        if self.catalogue.is_empty() {
            self.send_list(now);
        } else {
            self.next_list = Some(later(now, self.config.catalogue_refresh));
        }
        if self.watching.is_none() {
            self.resolve_wanted(now);
        }
    }

    /// Join the wanted stream if the catalogue allows, or report it unknown once.
    fn resolve_wanted(&mut self, now: Instant) {
        let Some(name) = self.wanted.clone() else {
            return;
        };
        if self.watching.as_ref().is_some_and(|s| s.name == name) {
            return;
        }
        if !self.catalogue_known {
            return;
        }
        let Some(info) = self.catalogue.iter().find(|s| s.name == name).cloned() else {
            if !self.unknown_reported {
                self.unknown_reported = true;
                tracing::warn!(stream = %name, "stream not in the catalogue");
                self.events.push_back(ClientEvent::UnknownStream(name));
            }
            return;
        };
        let Some(cur) = self.current else {
            return;
        };
        let to = self.pops[cur].addr;
        // The old stream is of no use anywhere now.
        self.send_leaves(|_| true);
        let old = self.watching.take();
        if let Some(old) = &old {
            let msg = self.leave_msg(cur, old);
            self.transmits.push_back(ControlTransmit { to, msg });
        }
        let msg = self.join_msg(cur, &info);
        self.transmits.push_back(ControlTransmit { to, msg });
        self.admitted = false;
        self.next_join = Some(later(now, self.join_interval()));
        if let Some(second) = self.second {
            let to2 = self.pops[second].addr;
            if let Some(old) = &old {
                let msg = self.leave_msg(second, old);
                self.transmits.push_back(ControlTransmit { to: to2, msg });
            }
            self.join_second(second, &info);
            self.second_admitted = false;
            self.next_join2 = Some(later(now, self.config.join_retry));
        }
        self.last_media = None;
        self.silent_since = None;
        tracing::info!(stream = %info.name, "watching");
        self.events.push_back(ClientEvent::Watching(info.clone()));
        self.watching = Some(info);
    }

    /// How long until the watched stream's next `Join` to the second PoP.
    fn join2_interval(&self) -> Duration {
        if self.second_admitted {
            self.config.join_refresh
        } else {
            self.config
                .join_retry
                .min(self.second.map_or(Duration::MAX, |c| self.quick_retry(c)))
        }
    }

    /// Over two paths: keep, take or replace the second PoP. The best usable PoP other
    /// than the current one whose path is disjoint from the current PoP's is preferred,
    /// else the best usable other one; a usable second PoP is only replaced by one that
    /// is disjoint when it is not (no flapping on scores).
    fn choose_second(&mut self, now: Instant) {
        let Some(cur) = self.current else {
            self.drop_second(now);
            return;
        };
        if self.tried_for != Some(cur) {
            self.tried.clear();
            self.tried_for = Some(cur);
        }
        let mut tried = std::mem::take(&mut self.tried);
        let rank = |i: usize| -> Option<(bool, f64)> {
            if i == cur {
                return None;
            }
            let score = self.score(&self.pops[i])?;
            let d = disjoint(&self.pops[cur].path, &self.pops[i].path) == Some(true);
            Some((d, score))
        };
        let best = (0..self.pops.len())
            .filter_map(|i| rank(i).map(|r| (i, r)))
            .min_by(|a, b| {
                b.1 .0
                    .cmp(&a.1 .0)
                    .then(a.1 .1.total_cmp(&b.1 .1))
                    .then(a.0.cmp(&b.0))
            });
        let keep = match (self.second.and_then(|s| rank(s).map(|r| (s, r))), best) {
            (Some((s, (d, _))), Some((_, (bd, _)))) => (d || !bd).then_some(s),
            (Some((s, _)), None) => Some(s),
            (None, _) => None,
        };
        // No PoP's path is disjoint from the first as the tree stands; a second PoP asked
        // to avoid the first path's nodes may find a way round them. One that did not
        // within SECOND_TRIAL is traded for the best PoP not tried yet.
        let stuck = keep.filter(|&s| {
            rank(s).is_some_and(|(d, _)| !d)
                && self
                    .second_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= SECOND_TRIAL)
        });
        let keep = match stuck {
            Some(s) => {
                if !tried.contains(&s) {
                    tried.push(s);
                }
                let untried = (0..self.pops.len())
                    .filter(|i| !tried.contains(i))
                    .filter_map(|i| rank(i).map(|r| (i, r.1)))
                    .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
                    .map(|(i, _)| i);
                if untried.is_none() && self.avoider != Some(cur) {
                    self.avoider = Some(cur);
                    tracing::info!(pop = %self.pops[cur].id, "no second PoP got round the first path: asking the first to avoid the second's");
                }
                untried.or(Some(s))
            }
            None => keep,
        };
        let want = keep.or(best.map(|b| b.0));
        self.tried = tried;
        if want == self.second {
            if self
                .avoider
                .is_none_or(|a| a != cur && Some(a) != self.second)
            {
                self.avoider = self.second;
            }
            return;
        }
        self.drop_second(now);
        if self.avoider != Some(cur) {
            self.avoider = want;
        }
        let Some(new) = want else {
            return;
        };
        self.second = Some(new);
        self.second_admitted = false;
        self.second_since = Some(now);
        if let Some(stream) = self.watching.clone() {
            self.leaving.retain(|l| l.1 != new);
            self.join_second(new, &stream);
            self.next_join2 = Some(later(now, self.config.join_retry));
        }
        tracing::info!(
            pop = %self.pops[new].id,
            disjoint = %match disjoint(&self.pops[cur].path, &self.pops[new].path) {
                Some(true) => "yes",
                Some(false) => "no",
                None => "unknown",
            },
            "second path"
        );
    }

    /// Send the `Join` of `stream` to the second PoP, with an `Avoid` of the current
    /// PoP's path when the second is the `avoider`.
    fn join_second(&mut self, second: usize, stream: &StreamInfo) {
        self.join_avoiding(second, self.current, stream);
    }

    /// Send the `Join` of `stream` to the current PoP, with an `Avoid` of the second
    /// path when the current PoP is the `avoider` (the second could not get round the
    /// first path, or it was the second and took the first's place).
    fn join_first(&mut self, cur: usize, stream: &StreamInfo) {
        self.join_avoiding(cur, self.second, stream);
    }

    /// Send the `Join` of `stream` to PoP `pop` and, when `pop` is the `avoider` and has
    /// given us a cookie, an `Avoid` of the nodes of `other`'s path but its server (so
    /// the two paths can keep clear of each other where the overlay allows).
    fn join_avoiding(&mut self, pop: usize, other: Option<usize>, stream: &StreamInfo) {
        let to = self.pops[pop].addr;
        let msg = self.join_msg(pop, stream);
        self.transmits.push_back(ControlTransmit { to, msg });
        let avoid: Vec<String> = other
            .filter(|_| self.avoider == Some(pop))
            .map(|o| self.pops[o].path.iter().skip(1).cloned().collect())
            .unwrap_or_default();
        if !avoid.is_empty() && self.pops[pop].cookie.is_some() {
            self.transmits.push_back(ControlTransmit {
                to,
                msg: Message::Avoid {
                    stream: stream.id,
                    data_port: self.data_port,
                    avoid,
                },
            });
        }
    }

    /// Stop using the second PoP: leave the watched stream there `leave_after` later.
    fn drop_second(&mut self, now: Instant) {
        let Some(old) = self.second.take() else {
            return;
        };
        self.second_admitted = false;
        self.next_join2 = None;
        if Some(old) != self.current {
            if let Some(stream) = self.watching.clone() {
                self.leaving
                    .push((later(now, self.config.leave_after), old, stream));
            }
        }
    }

    /// How long until the watched stream's next `Join` to the current PoP: a refresh
    /// once it admitted us, a retry before.
    fn join_interval(&self) -> Duration {
        if self.admitted {
            self.config.join_refresh
        } else {
            self.config
                .join_retry
                .min(self.current.map_or(Duration::MAX, |c| self.quick_retry(c)))
        }
    }

    /// How soon an unanswered `Join` at PoP `p` is repeated when its round trip is
    /// known: twice the smoothed RTT plus [`QUICK_RETRY_SLACK`] (at least
    /// [`QUICK_RETRY_MIN`]). Under a few percent of loss on every link a lost `Join`,
    /// cookie or `Admitted` cost [`ClientConfig::join_retry`] of media after a PoP
    /// change; a round trip is all it needs to cost.
    fn quick_retry(&self, p: usize) -> Duration {
        self.pops[p].srtt.map_or(self.config.join_retry, |rtt| {
            (rtt * 2 + QUICK_RETRY_SLACK).max(QUICK_RETRY_MIN)
        })
    }

    /// Send the pending `Leave`s whose time `due` accepts.
    fn send_leaves(&mut self, due: impl Fn(Instant) -> bool) {
        let mut i = 0;
        while i < self.leaving.len() {
            if due(self.leaving[i].0) {
                let (_, pop, stream) = self.leaving.swap_remove(i);
                let msg = self.leave_msg(pop, &stream);
                self.transmits.push_back(ControlTransmit {
                    to: self.pops[pop].addr,
                    msg,
                });
            } else {
                i += 1;
            }
        }
    }

    /// The `Join` to send to PoP `pop`: echoing its cookie once it sent one, else a
    /// first `Join` (which the PoP answers with a cookie).
    fn join_msg(&self, pop: usize, s: &StreamInfo) -> Message {
        match self.pops.get(pop).and_then(|p| p.cookie) {
            Some(cookie) => Message::ViewerJoin {
                stream: s.id,
                data_port: self.data_port,
                cookie,
            },
            None => Message::Join {
                stream: s.id,
                data_port: self.data_port,
                from: None,
            },
        }
    }

    /// The `Leave` to send to PoP `pop`, with its cookie (without one the PoP never
    /// admitted us: the plain `Leave` is only a courtesy it ignores).
    fn leave_msg(&self, pop: usize, s: &StreamInfo) -> Message {
        match self.pops.get(pop).and_then(|p| p.cookie) {
            Some(cookie) => Message::ViewerLeave {
                stream: s.id,
                data_port: self.data_port,
                cookie,
            },
            None => Message::Leave {
                stream: s.id,
                data_port: self.data_port,
            },
        }
    }

    /// A PoP's cookie for our data address: remember it and, if we watch a stream
    /// there, echo it at once (the PoP sends nothing before).
    fn on_cookie(&mut self, now: Instant, idx: usize, stream: u32, data_port: u16, cookie: u64) {
        if data_port != self.data_port {
            self.stats.unexpected += 1;
            return;
        }
        self.pops[idx].cookie = Some(cookie);
        let Some(s) = self.watching.as_ref().filter(|s| s.id == stream).cloned() else {
            return;
        };
        if self.current == Some(idx) {
            self.join_first(idx, &s);
            self.next_join = Some(later(now, self.join_interval()));
        } else if self.second == Some(idx) {
            self.join_second(idx, &s);
            self.next_join2 = Some(later(now, self.join2_interval()));
        }
    }
}

/// Whether two tree paths (node ids from the server, inclusive) share no node but a
/// common server at their root; `None` when either is unknown.
pub fn disjoint(a: &[String], b: &[String]) -> Option<bool> {
    let (Some(ra), Some(rb)) = (a.first(), b.first()) else {
        return None;
    };
    let skip = usize::from(ra == rb);
    Some(!a[skip..].iter().any(|x| b[skip..].contains(x)))
}

fn push_outcome(history: &mut VecDeque<bool>, window: usize, answered: bool) {
    history.push_back(answered);
    while history.len() > window {
        history.pop_front();
    }
}

/// The loss of a PoP's probes: the fraction lost of the last `loss_window`, but over
/// [`LOSS_EARLY_PROBES`] (or the window if smaller) at least while fewer were resolved.
/// One probe lost of the first three is no 33 % loss: under 5 % of random loss it moved
/// viewers to another PoP a few seconds after their first choice.
fn loss(p: &Pop, window: usize) -> f64 {
    let lost = p.history.iter().filter(|ok| !**ok).count();
    let over = p.history.len().max(LOSS_EARLY_PROBES.min(window)).max(1);
    lost as f64 / over as f64
}

/// `t + d`, saturating far in the future instead of panicking on absurd durations.
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(t)
}

#[cfg(test)]
// Tests take the real clock as an arbitrary origin of fake time, and read sample files.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("literal address")
    }

    #[test]
    fn a_pop_answering_from_another_of_its_addresses_is_the_pop() {
        let t0 = Instant::now();
        // p is known by 10.0.0.1 (its first link) but the client sends to 10.0.2.1.
        let p = PeerAddrs::new(
            "p",
            addr("10.0.2.1:7000"),
            vec![addr("10.0.0.1:7000"), addr("10.0.2.1:7000")],
        );
        let mut c = Client::with_pops(ClientConfig::default(), vec![p], 9000, t0, t0);
        let probe = c.poll_transmit().expect("a probe");
        assert_eq!(probe.to, addr("10.0.2.1:7000"));
        let Message::Probe { nonce, sent_us } = probe.msg else {
            panic!("a probe: {:?}", probe.msg)
        };
        let reply = Message::ProbeReply {
            nonce,
            echo_us: sent_us,
            pop: "p".into(),
            path_latency_us: Some(1_000),
            hops: 1,
            viewers: 0,
            path: Vec::new(),
        };
        // From a stranger: ignored.
        c.handle(t0, addr("10.0.9.9:7000"), reply.clone());
        assert_eq!(c.stats().unknown_sender, 1);
        assert_eq!(c.pop(), None);
        // From the PoP's other address: the PoP's answer.
        c.handle(t0 + Duration::from_millis(3), addr("10.0.0.1:7000"), reply);
        assert_eq!(c.pop(), Some("p"));
        assert_eq!(c.stats().unknown_sender, 1);
        // Requests still go to the address it was given to send to.
        let next = c.poll_transmit().expect("ListStreams");
        assert_eq!(next.to, addr("10.0.2.1:7000"));
    }

    /// Probe rounds: each PoP's probe (PoPs as (id, address, path latency µs))
    /// answered unless `lost` says otherwise for (round, PoP), a round every probe
    /// interval.
    fn probe_rounds(
        c: &mut Client,
        t0: Instant,
        rounds: u32,
        pops: &[(&str, SocketAddr, u64)],
        lost: impl Fn(u32, &str) -> bool,
    ) -> Instant {
        let mut t = t0;
        for round in 0..rounds {
            c.handle_timeout(t);
            let probes: Vec<ControlTransmit> = std::iter::from_fn(|| c.poll_transmit())
                .filter(|x| matches!(x.msg, Message::Probe { .. }))
                .collect();
            for x in probes {
                let Message::Probe { nonce, sent_us } = x.msg else {
                    continue;
                };
                let Some(&(id, _, us)) = pops.iter().find(|(_, a, _)| *a == x.to) else {
                    continue;
                };
                if lost(round, id) {
                    continue;
                }
                let reply = Message::ProbeReply {
                    nonce,
                    echo_us: sent_us,
                    pop: id.into(),
                    path_latency_us: Some(us),
                    hops: 2,
                    viewers: 0,
                    path: Vec::new(),
                };
                c.handle(t + Duration::from_millis(2), x.to, reply);
            }
            t += c.config.probe_interval;
        }
        t
    }

    #[test]
    fn one_probe_lost_early_is_not_a_third_of_loss() {
        // Two PoPs, "a" 10 % better than "bb"; a's second probe is lost: over the first
        // three, that was 33 % loss and moved the client to bb.
        let t0 = Instant::now();
        let pops = [
            ("a", addr("10.0.0.1:7000"), 18_000),
            ("bb", addr("10.0.0.2:7000"), 20_000),
        ];
        let mut c = Client::new(
            ClientConfig::default(),
            pops.iter().map(|&(id, a, _)| (id.into(), a)).collect(),
            9000,
            t0,
            t0,
        );
        let t = probe_rounds(&mut c, t0, 4, &pops, |round, id| round == 1 && id == "a");
        assert_eq!(c.pop(), Some("a"));
        assert_eq!(c.pop_switches(), 0);
        // A PoP that loses half its probes is still left once that shows.
        probe_rounds(&mut c, t, 12, &pops, |round, id| {
            id == "a" && round % 2 == 0
        });
        assert_eq!(c.pop(), Some("bb"));
    }

    #[test]
    fn the_client_echoes_the_cookie_and_reports_the_session_key() {
        let t0 = Instant::now();
        let pop = addr("10.0.0.1:7000");
        let mut c = Client::new(
            ClientConfig::default(),
            vec![("p".into(), pop)],
            9000,
            t0,
            t0,
        );
        c.select_stream(t0, "news");
        let Message::Probe { nonce, sent_us } = c.poll_transmit().expect("probe").msg else {
            panic!("a probe")
        };
        let t1 = t0 + Duration::from_millis(2);
        c.handle(
            t1,
            pop,
            Message::ProbeReply {
                nonce,
                echo_us: sent_us,
                pop: "p".into(),
                path_latency_us: Some(1_000),
                hops: 1,
                viewers: 0,
                path: Vec::new(),
            },
        );
        let news = StreamInfo::new("news", ott_proto::MediaKind::Mjpeg, 25_000);
        c.handle(
            t1,
            pop,
            Message::Streams {
                streams: vec![news.clone()],
            },
        );
        let sent: Vec<Message> = std::iter::from_fn(|| c.poll_transmit())
            .map(|t| t.msg)
            .collect();
        assert!(sent.contains(&Message::Join {
            stream: news.id,
            data_port: 9000,
            from: None
        }));
        // A cookie for another port is not ours; from a stranger neither.
        let cookie = |port| Message::Cookie {
            stream: news.id,
            data_port: port,
            cookie: 77,
        };
        c.handle(t1, pop, cookie(9001));
        c.handle(t1, addr("10.0.0.9:7000"), cookie(9000));
        assert_eq!(std::iter::from_fn(|| c.poll_transmit()).count(), 0);
        // The PoP's: echoed at once, and in every refresh and the Leave after.
        c.handle(t1, pop, cookie(9000));
        let echo = Message::ViewerJoin {
            stream: news.id,
            data_port: 9000,
            cookie: 77,
        };
        assert_eq!(c.poll_transmit().map(|t| t.msg), Some(echo.clone()));
        c.handle_timeout(t1 + Duration::from_secs(1));
        let refresh: Vec<Message> = std::iter::from_fn(|| c.poll_transmit())
            .map(|t| t.msg)
            .collect();
        assert!(refresh.contains(&echo), "{refresh:?}");
        while c.poll_event().is_some() {}
        let admitted = Message::Admitted {
            stream: news.id,
            data_port: 9000,
            session_key: [3; 32],
        };
        c.handle(t1, pop, admitted.clone());
        assert_eq!(
            c.poll_event(),
            Some(ClientEvent::Session {
                pop: "p".into(),
                key: SessionKey::from_bytes([3; 32])
            })
        );
        // The same key again is no news.
        c.handle(t1, pop, admitted);
        assert_eq!(c.poll_event(), None);
        c.shutdown(t1);
        assert_eq!(
            c.poll_transmit().map(|t| t.msg),
            Some(Message::ViewerLeave {
                stream: news.id,
                data_port: 9000,
                cookie: 77
            })
        );
    }

    #[test]
    fn a_join_is_retried_quickly_until_the_pop_admits_then_refreshed() {
        let t0 = Instant::now();
        let pop = addr("10.0.0.1:7000");
        let mut c = Client::new(
            ClientConfig::default(),
            vec![("p".into(), pop)],
            9000,
            t0,
            t0,
        );
        c.select_stream(t0, "news");
        let Message::Probe { nonce, sent_us } = c.poll_transmit().expect("probe").msg else {
            panic!("a probe")
        };
        // A round trip of 50 ms.
        let t0 = t0 + Duration::from_millis(50);
        c.handle(
            t0,
            pop,
            Message::ProbeReply {
                nonce,
                echo_us: sent_us,
                pop: "p".into(),
                path_latency_us: Some(1_000),
                hops: 1,
                viewers: 0,
                path: Vec::new(),
            },
        );
        let news = StreamInfo::new("news", ott_proto::MediaKind::Mjpeg, 25_000);
        c.handle(
            t0,
            pop,
            Message::Streams {
                streams: vec![news.clone()],
            },
        );
        let joins = |c: &mut Client| {
            std::iter::from_fn(|| c.poll_transmit())
                .filter(|t| matches!(t.msg, Message::Join { .. } | Message::ViewerJoin { .. }))
                .count()
        };
        assert_eq!(joins(&mut c), 1);
        // The Join was lost: it goes again after two round trips and a little (110 ms),
        // not a refresh period (nor the 200 ms retry period).
        let quick = Duration::from_millis(110);
        c.handle_timeout(t0 + quick - Duration::from_millis(1));
        assert_eq!(joins(&mut c), 0);
        c.handle_timeout(t0 + quick);
        assert_eq!(joins(&mut c), 1);
        let retry = ClientConfig {
            join_retry: Duration::from_millis(150),
            ..ClientConfig::default()
        };
        assert_eq!(
            Client::new(retry, vec![("p".into(), pop)], 9000, t0, t0).join_interval(),
            Duration::from_millis(150),
            "no round trip known: the retry period"
        );
        let retry = quick;
        // Admitted: from here on only refreshes.
        let t1 = t0 + retry;
        c.handle(
            t1,
            pop,
            Message::Admitted {
                stream: news.id,
                data_port: 9000,
                session_key: [1; 32],
            },
        );
        c.handle_timeout(t1 + retry);
        assert_eq!(joins(&mut c), 1, "the retry already scheduled");
        let t2 = t1 + retry;
        c.handle_timeout(t2 + retry);
        assert_eq!(joins(&mut c), 0);
        c.handle_timeout(t2 + ClientConfig::default().join_refresh);
        assert_eq!(joins(&mut c), 1);
    }
}
