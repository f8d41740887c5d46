//! The HTTP output for browsers and players, served by the client (`ott-client --http`)
//! and by a PoP (`ott-node --http`, see [`crate::edge`]) on the same routes.
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | HTML: the streams, each with its kind, linking to its page |
//! | `GET /watch/NAME` | HTML: a page that plays NAME at once (muted autoplay): MPEG-TS/H.264 in a `<video>` over HLS, MJPEG as an `<img>`; live facts under it (PoP, fps, stalls, latency) and the other streams one click away |
//! | `GET /hls/NAME/index.m3u8` | the HLS playlist of an MPEG-TS stream (LL-HLS: partial segments, blocking reload with `_HLS_msn`/`_HLS_part`, a preload hint), made by [`ott_media::hls`] from the frames received |
//! | `GET /hls/NAME/sN.ts`, `/hls/NAME/pN.I.ts` | a segment, a partial segment (`video/mp2t`) |
//! | `GET /mjpeg/NAME` | MJPEG as `multipart/x-mixed-replace`, one `image/jpeg` part per frame |
//! | `GET /ts/NAME` | the raw MPEG-TS (`video/mp2t`), for ffplay, mpv, VLC |
//! | `GET /facts/NAME` | JSON: what the page shows under the picture |
//! | `GET /streams` | JSON: the catalogue (and on the client, the stream watched) |
//!
//! The client only plays the stream it watches: another NAME gets `409` and its page a
//! button that switches (`POST /switch`, form `stream=NAME`, same-origin only, see
//! [`httpd::check_same_origin`]). The client also keeps its first routes: `/stream`
//! (the stream watched, of either kind), `/stream.mjpeg` and `/stream.ts`.
//!
//! A stream response starts at the latest decodable start (the last JPEG; for TS the
//! units since the last keyframe), then follows live. A slow reader loses frames
//! (counted), never stalls the viewer; one that keeps losing them for [`SLOW_READER`],
//! or does not take a frame within the server's write timeout, is dropped. HLS memory
//! is the segmenter's bounded window ([`HLS`]). Everything shown that came from the
//! network (stream names) is escaped for where it goes; pages may not be framed.
//!
//! Served by [`crate::httpd`] within its default limits.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use ott_media::hls::{self, HlsConfig, Lookup, Segmenter};
use ott_proto::{untrusted, MediaKind, StreamInfo};

use crate::httpd::{self, HttpRequest, HttpResponse, HttpStats, Limits, Reply, Router, StreamConn};
use crate::status::StatusSource;

/// Frames queued per streaming response before frames are dropped for it.
const QUEUE: usize = 64;
/// Most bytes of the latest decodable start kept for new HTTP viewers.
const MAX_START: usize = 8 << 20;
/// A streaming response whose queue stays full this long is dropped.
pub const SLOW_READER: Duration = Duration::from_secs(10);
/// A streaming response ends after this long without a frame.
const IDLE_END: Duration = Duration::from_secs(30);
/// How long an HLS request waits for what it asks: the first segment, a blocking
/// playlist reload, a hinted part.
const HLS_WAIT: Duration = Duration::from_secs(8);
/// A gap between two frames longer than this counts as a stall (as in the client).
const STALL: Duration = crate::viewer::STALL;
/// Frame arrival times kept for the fps figure.
const FPS_WINDOW: Duration = Duration::from_secs(2);
const BOUNDARY: &str = "ottframe";
/// A playlist request from an address that got the playlist this recently, and since
/// then no segment completed, waits for the next segment (within [`HLS_WAIT`]): a
/// player reloads when it has everything, and an answer with nothing new only makes
/// it ask again at once (Chromium does).
const RELOAD_MEMORY: Duration = Duration::from_secs(10);
/// Players remembered per stream for [`RELOAD_MEMORY`].
const MAX_SERVED: usize = 256;

/// Who asks for a playlist: the player's own token (`?s=TOKEN` in the playlist URL, as
/// the `/watch/` page adds), else its address.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Player {
    Token(String),
    Addr(IpAddr),
}

impl Player {
    fn of(req: &HttpRequest) -> Self {
        match HttpRequest::form_value(&req.query, "s") {
            Some(t)
                if !t.is_empty()
                    && t.len() <= 32
                    && t.bytes().all(|b| b.is_ascii_alphanumeric()) =>
            {
                Player::Token(t)
            }
            _ => Player::Addr(req.peer.ip()),
        }
    }
}

/// The HLS segmenter's settings here: segments cut at keyframes (at least 1 s), parts
/// of at most 0.5 s, six segments and 16 MiB per stream at most.
pub const HLS: HlsConfig = HlsConfig {
    segment_target: hls::CLOCK,
    part_target: hls::CLOCK / 2,
    max_segment: 10 * hls::CLOCK,
    max_segment_bytes: 4 << 20,
    window: 6,
    max_bytes: 16 << 20,
    max_gap: 5 * hls::CLOCK,
    default_unit: hls::CLOCK / 25,
};

enum Msg {
    Frame(Bytes),
    End,
}

struct Sub {
    tx: Sender<Msg>,
    /// Since when its queue has been full (frames dropped), if it is.
    lagging_since: Option<Instant>,
    /// Cleared when the response ends (the reader went away or was dropped).
    alive: Arc<AtomicBool>,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct FeedState {
    subs: Vec<Sub>,
    /// Frames since the last keyframe.
    start: VecDeque<Bytes>,
    start_bytes: usize,
    hls: Option<Segmenter>,
    frames: u64,
    bytes: u64,
    stalls: u64,
    last_frame: Option<Instant>,
    recent: VecDeque<Instant>,
    /// Wall-clock ms when the latest frame arrived, and its 33-bit decode time (TS).
    last_arrival_ms: Option<u64>,
    last_pts: Option<u64>,
    /// Wall-clock ms when the newest complete HLS segment was completed.
    newest_done_ms: Option<u64>,
    /// The last HTTP request for this stream, or the last viewer leaving.
    last_activity: Instant,
    /// HLS requests in progress (waiting ones count as viewers).
    busy: usize,
    /// Who got a playlist lately, and the segment being made then (see [`RELOAD_MEMORY`]).
    served: VecDeque<(Player, u64, Instant)>,
    ended: bool,
}

/// One stream as served over HTTP: the streaming responses that follow it, its latest
/// decodable start, its HLS segments (MPEG-TS only) and what the page shows about it.
pub struct Feed {
    info: StreamInfo,
    state: Mutex<FeedState>,
    changed: Condvar,
    dropped: Arc<AtomicU64>,
}

impl Feed {
    /// An empty feed of `info`; frames dropped for slow readers are counted in `dropped`.
    pub fn new(info: StreamInfo, dropped: Arc<AtomicU64>) -> Arc<Self> {
        let hls = (info.kind == MediaKind::Ts).then(|| Segmenter::new(HLS));
        Arc::new(Self {
            info,
            state: Mutex::new(FeedState {
                subs: Vec::new(),
                start: VecDeque::new(),
                start_bytes: 0,
                hls,
                frames: 0,
                bytes: 0,
                stalls: 0,
                last_frame: None,
                recent: VecDeque::new(),
                last_arrival_ms: None,
                last_pts: None,
                newest_done_ms: None,
                last_activity: Instant::now(),
                busy: 0,
                served: VecDeque::new(),
                ended: false,
            }),
            changed: Condvar::new(),
            dropped,
        })
    }

    /// The stream.
    pub fn info(&self) -> &StreamInfo {
        &self.info
    }

    fn lock(&self) -> MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A frame, in order; `keyframe` when it is a decodable start.
    pub fn frame(&self, data: &Bytes, keyframe: bool) {
        let now = Instant::now();
        let mut s = self.lock();
        if let Some(last) = s.last_frame {
            if now.duration_since(last) > STALL {
                s.stalls += 1;
            }
        }
        s.last_frame = Some(now);
        s.frames += 1;
        s.bytes += data.len() as u64;
        s.recent.push_back(now);
        while s
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > FPS_WINDOW)
        {
            s.recent.pop_front();
        }
        s.last_arrival_ms = Some(wall_ms());
        if keyframe {
            s.start.clear();
            s.start_bytes = 0;
        }
        if s.start_bytes + data.len() <= MAX_START {
            s.start_bytes += data.len();
            s.start.push_back(data.clone());
        }
        if let Some(seg) = s.hls.as_mut() {
            let t = hls::unit_time(data);
            let before = seg.sequence().1;
            seg.push(data.clone(), keyframe, t);
            let completed = seg.sequence().1 != before;
            if t.is_some() {
                s.last_pts = t;
            }
            if completed {
                s.newest_done_ms = s.last_arrival_ms;
            }
        }
        let mut dropped = 0;
        s.subs.retain_mut(|sub| {
            if !sub.alive.load(Ordering::Relaxed) {
                return false;
            }
            match sub.tx.try_send(Msg::Frame(data.clone())) {
                Ok(()) => {
                    sub.lagging_since = None;
                    true
                }
                Err(TrySendError::Full(_)) => {
                    dropped += 1;
                    let since = *sub.lagging_since.get_or_insert(now);
                    // Dropping the sender ends the response once its queue is written.
                    now.duration_since(since) < SLOW_READER
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
        drop(s);
        self.changed.notify_all();
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
    }

    /// A receiver of the stream from its latest decodable start on, and the guard that
    /// says when its response ends.
    fn subscribe(self: &Arc<Self>) -> (Receiver<Msg>, SubGuard) {
        let mut s = self.lock();
        let (tx, rx) = crossbeam_channel::bounded(QUEUE + s.start.len());
        for f in &s.start {
            let _ = tx.try_send(Msg::Frame(f.clone()));
        }
        let alive = Arc::new(AtomicBool::new(true));
        if s.ended {
            let _ = tx.try_send(Msg::End);
        }
        s.subs.push(Sub {
            tx,
            lagging_since: None,
            alive: alive.clone(),
        });
        s.last_activity = Instant::now();
        (
            rx,
            SubGuard {
                feed: self.clone(),
                alive,
            },
        )
    }

    /// Move the streaming responses of `other` here (a client's switch between two
    /// streams of one kind: they go on with this stream from its first keyframe).
    fn adopt(&self, other: &Feed) {
        let subs = std::mem::take(&mut other.lock().subs);
        self.lock().subs.extend(subs);
    }

    /// End every response of this feed and wake every waiting request.
    pub fn end(&self) {
        let mut s = self.lock();
        s.ended = true;
        for sub in s.subs.drain(..) {
            let _ = sub.tx.try_send(Msg::End);
        }
        drop(s);
        self.changed.notify_all();
    }

    /// Note an HTTP request for this stream now.
    pub fn touch(&self) {
        self.lock().last_activity = Instant::now();
    }

    /// Viewers right now: streaming responses, and HLS requests in progress.
    pub fn viewers(&self) -> usize {
        let s = self.lock();
        s.subs
            .iter()
            .filter(|x| x.alive.load(Ordering::Relaxed))
            .count()
            + s.busy
    }

    /// How long nobody has watched: `None` while a response streams or an HLS request
    /// waits, else the time since the last request or the last viewer left.
    pub fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.viewers() > 0 {
            return None;
        }
        Some(now.saturating_duration_since(self.lock().last_activity))
    }

    fn busy(self: &Arc<Self>) -> BusyGuard {
        let mut s = self.lock();
        s.busy += 1;
        s.last_activity = Instant::now();
        BusyGuard { feed: self.clone() }
    }

    /// Wait until `ready` holds of the state, the feed ends, or `deadline`.
    fn wait_until(
        &self,
        deadline: Instant,
        mut ready: impl FnMut(&FeedState) -> bool,
    ) -> MutexGuard<'_, FeedState> {
        let mut s = self.lock();
        loop {
            let now = Instant::now();
            if ready(&s) || s.ended || now >= deadline {
                return s;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// The HLS playlist, once it has a segment; with `block` (`_HLS_msn`, `_HLS_part`),
    /// once it has that part or segment (LL-HLS blocking reload), within [`HLS_WAIT`].
    fn playlist(
        &self,
        mut block: Option<(u64, Option<u64>)>,
        window: usize,
        peer: &Player,
    ) -> Result<String, (u16, String)> {
        if self.info.kind != MediaKind::Ts {
            return Err((409, not_ts(&self.info)));
        }
        let deadline = Instant::now() + HLS_WAIT;
        if block.is_none() {
            // A reload from a player that has everything listed waits for something new.
            let s = self.lock();
            let next = s.hls.as_ref().map(|h| h.sequence().1);
            if let Some((_, seen, at)) = s.served.iter().find(|(p, _, _)| p == peer) {
                if Some(*seen) == next && at.elapsed() < RELOAD_MEMORY {
                    block = Some((*seen, None));
                }
            }
        }
        let s = self.wait_until(deadline, |s| {
            s.hls
                .as_ref()
                .is_some_and(|h| h.ready() && block.is_none_or(|(msn, part)| h.has(msn, part)))
        });
        let mut s = s;
        let next = s.hls.as_ref().map(|h| h.sequence().1);
        if let Some(next) = next {
            s.served.retain(|(p, _, _)| p != peer);
            if s.served.len() >= MAX_SERVED {
                s.served.pop_front();
            }
            s.served.push_back((peer.clone(), next, Instant::now()));
        }
        match s.hls.as_ref() {
            Some(h) if h.ready() => Ok(h.playlist_last(window)),
            Some(_) => Err((
                503,
                format!(
                    "no complete segment of {} yet: retry",
                    untrusted(&self.info.name)
                ),
            )),
            None => Err((409, not_ts(&self.info))),
        }
    }

    /// A segment or part by name, waiting within [`HLS_WAIT`] for one that is due.
    fn segment(&self, name: &str) -> Result<Bytes, (u16, String)> {
        let deadline = Instant::now() + HLS_WAIT;
        let mut found = Lookup::Invalid;
        let _s = self.wait_until(deadline, |s| {
            found = s.hls.as_ref().map_or(Lookup::Invalid, |h| h.lookup(name));
            found != Lookup::Pending
        });
        match found {
            Lookup::Ready(b) => Ok(b),
            Lookup::Pending => Err((503, format!("{} is not ready yet", untrusted(name)))),
            Lookup::Gone => Err((
                404,
                format!("{} is no longer (or not yet) held", untrusted(name)),
            )),
            Lookup::Invalid => Err((404, format!("no segment called {}", untrusted(name)))),
        }
    }

    /// What the page shows about this stream, as JSON.
    pub fn facts(&self) -> serde_json::Value {
        let s = self.lock();
        let now = Instant::now();
        let fps = match (s.recent.front(), s.recent.back()) {
            (Some(a), Some(b)) if s.recent.len() > 1 && b > a => {
                (s.recent.len() - 1) as f64 / b.duration_since(*a).as_secs_f64()
            }
            _ => 0.0,
        };
        let hls = s.hls.as_ref().map(|h| {
            let (first, next) = h.sequence();
            serde_json::json!({
                "first": first,
                "next": next,
                "bytes": h.bytes(),
                "edge_s": h.live_edge(),
                "segments": h.stats().segments,
                "newest_done_ms": s.newest_done_ms,
            })
        });
        serde_json::json!({
            "stream": self.info.name,
            "kind": kind_name(self.info.kind),
            "frames": s.frames,
            "bytes": s.bytes,
            "fps": (fps * 10.0).round() / 10.0,
            "stalls": s.stalls,
            "since_last_frame_ms": s.last_frame.map(|t| now.duration_since(t).as_millis() as u64),
            "last_arrival_ms": s.last_arrival_ms,
            "last_pts_s": s.last_pts.map(|p| p as f64 / hls::CLOCK as f64),
            "viewers": s.subs.iter().filter(|x| x.alive.load(Ordering::Relaxed)).count() + s.busy,
            "hls": hls,
            "now_ms": wall_ms(),
        })
    }
}

/// Marks a streaming response as gone when dropped.
struct SubGuard {
    feed: Arc<Feed>,
    alive: Arc<AtomicBool>,
}

impl Drop for SubGuard {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
        self.feed.touch();
    }
}

/// Counts an HLS request in progress.
struct BusyGuard {
    feed: Arc<Feed>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut s = self.feed.lock();
        s.busy = s.busy.saturating_sub(1);
        s.last_activity = Instant::now();
    }
}

fn not_ts(info: &StreamInfo) -> String {
    format!(
        "{} is {}: HLS and /ts/ are for MPEG-TS streams; use /mjpeg/{}",
        untrusted(&info.name),
        kind_name(info.kind),
        path_encode(&info.name)
    )
}

#[derive(Default)]
struct HubState {
    watching: Option<StreamInfo>,
    catalogue: Vec<StreamInfo>,
    pop: Option<String>,
    feed: Option<Arc<Feed>>,
}

/// The output of one viewer (the client, or one stream a PoP's edge watches): what it
/// watches, the catalogue it knows and the [`Feed`] of its stream. The viewer feeds it.
pub struct Hub {
    state: Mutex<HubState>,
    stats: Arc<HttpStats>,
    /// Frames not queued for a slow reader.
    dropped: Arc<AtomicU64>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::with_counter(
            Arc::new(AtomicU64::new(0)),
            Arc::new(HttpStats::new("http")),
        )
    }

    /// An empty hub counting into shared counters.
    pub fn with_counter(dropped: Arc<AtomicU64>, stats: Arc<HttpStats>) -> Self {
        Self {
            state: Mutex::new(HubState::default()),
            stats,
            dropped,
        }
    }

    /// A hub whose stream is `feed` before the viewer has joined it.
    pub fn for_feed(feed: Arc<Feed>, dropped: Arc<AtomicU64>, stats: Arc<HttpStats>) -> Self {
        let hub = Self::with_counter(dropped, stats);
        hub.lock().feed = Some(feed);
        hub
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The viewer now watches `info`. A feed of that very stream goes on; else a new one
    /// starts, taking over the responses of the old one when of the same kind (they go
    /// on from the new stream's first keyframe) and ending them otherwise.
    pub fn set_watching(&self, info: &StreamInfo) {
        let mut s = self.lock();
        s.watching = Some(info.clone());
        if s.feed.as_ref().is_some_and(|f| f.info.id == info.id) {
            return;
        }
        let feed = Feed::new(info.clone(), self.dropped.clone());
        if let Some(old) = s.feed.take() {
            if old.info.kind == info.kind {
                feed.adopt(&old);
            }
            old.end();
        }
        s.feed = Some(feed);
    }

    /// The catalogue changed.
    pub fn set_catalogue(&self, streams: &[StreamInfo]) {
        self.lock().catalogue = streams.to_vec();
    }

    /// The viewer's PoP changed.
    pub fn set_pop(&self, pop: &str) {
        self.lock().pop = Some(pop.to_string());
    }

    /// A frame of the stream watched, written in order; `keyframe` when it is a
    /// decodable start. The viewer only passes frames from a keyframe on.
    pub fn frame(&self, data: &Bytes, keyframe: bool) {
        let feed = self.lock().feed.clone();
        if let Some(f) = feed {
            f.frame(data, keyframe);
        }
    }

    /// The stream watched.
    pub fn watching(&self) -> Option<StreamInfo> {
        self.lock().watching.clone()
    }

    /// The catalogue last known.
    pub fn catalogue(&self) -> Vec<StreamInfo> {
        self.lock().catalogue.clone()
    }

    /// The viewer's PoP.
    pub fn pop(&self) -> Option<String> {
        self.lock().pop.clone()
    }

    /// The feed of the stream watched.
    pub fn feed(&self) -> Option<Arc<Feed>> {
        self.lock().feed.clone()
    }

    /// Frames dropped for slow HTTP readers so far.
    pub fn dropped_frames(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The counters of the HTTP server of this output.
    pub fn http_stats(&self) -> &Arc<HttpStats> {
        &self.stats
    }

    /// Prometheus text of the output's own counters (the server's are in
    /// [`Hub::http_stats`]).
    pub fn metrics(&self) -> String {
        dropped_metric(self.stats.name(), self.dropped_frames())
    }
}

/// The Prometheus family of frames dropped for slow readers of server `name`.
pub fn dropped_metric(name: &str, dropped: u64) -> String {
    format!(
        "# HELP ott_http_frames_dropped_total Frames not sent to slow HTTP readers.\n# TYPE ott_http_frames_dropped_total counter\nott_http_frames_dropped_total{{server=\"{name}\"}} {dropped}\n",
    )
}

/// A display name of a media kind.
pub fn kind_name(k: MediaKind) -> &'static str {
    match k {
        MediaKind::Mjpeg => "MJPEG",
        MediaKind::Ts => "MPEG-TS",
    }
}

/// The client's `--status` source with the `--http` output's counters added (when the
/// client has one): `/metrics` shows the HTTP server's counters and the frames dropped
/// for slow readers, `/status` the same under `"http"`.
pub fn with_hub(source: Arc<dyn StatusSource>, hub: Option<Arc<Hub>>) -> Arc<dyn StatusSource> {
    match hub {
        Some(hub) => Arc::new(WithHub { inner: source, hub }),
        None => source,
    }
}

struct WithHub {
    inner: Arc<dyn StatusSource>,
    hub: Arc<Hub>,
}

impl StatusSource for WithHub {
    fn status(&self) -> serde_json::Value {
        let mut v = self.inner.status();
        if let Some(o) = v.as_object_mut() {
            let mut http = serde_json::to_value(self.hub.stats.snapshot()).unwrap_or_default();
            if let Some(h) = http.as_object_mut() {
                h.insert("frames_dropped".into(), self.hub.dropped_frames().into());
            }
            o.insert("http".into(), http);
        }
        v
    }

    fn metrics(&self) -> String {
        self.inner.metrics() + &self.hub.metrics()
    }

    fn http_stats(&self) -> Vec<Arc<HttpStats>> {
        let mut v = self.inner.http_stats();
        v.push(self.hub.stats.clone());
        v
    }
}

/// Why a stream cannot be served: an HTTP status and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// What happened and what to do.
    pub message: String,
}

impl Refusal {
    /// A refusal with `status`.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn reply(&self) -> Reply {
        HttpResponse::text(self.status, format!("{}\n", self.message)).into()
    }
}

/// What the HTTP output serves from: the client's one stream, or a PoP's edge.
pub trait Source: Send + Sync + 'static {
    /// `client` or `pop`.
    fn role(&self) -> &'static str;
    /// The PoP the stream comes from (the PoP itself on a PoP).
    fn pop(&self) -> Option<String>;
    /// The stream catalogue.
    fn catalogue(&self) -> Vec<StreamInfo>;
    /// On the client, the stream it watches (the only one it serves); `None` on a PoP.
    fn watching(&self) -> Option<StreamInfo>;
    /// The feed of `name` for a viewer asking now (a PoP joins the stream if needed).
    fn open(&self, name: &str) -> Result<Arc<Feed>, Refusal>;
    /// The feed of `name` if it is being received, without joining anything.
    fn peek(&self, name: &str) -> Option<Arc<Feed>>;
    /// Facts about the source to add to `/facts/NAME` (e.g. the PoP's path latency).
    fn extra_facts(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// The switch channel (client only).
    fn switcher(&self) -> Option<&Sender<String>> {
        None
    }
}

/// The client as a [`Source`]: it serves the stream it watches.
struct ClientSource {
    hub: Arc<Hub>,
    switch: Sender<String>,
}

impl Source for ClientSource {
    fn role(&self) -> &'static str {
        "client"
    }

    fn pop(&self) -> Option<String> {
        self.hub.pop()
    }

    fn catalogue(&self) -> Vec<StreamInfo> {
        self.hub.catalogue()
    }

    fn watching(&self) -> Option<StreamInfo> {
        self.hub.watching()
    }

    fn open(&self, name: &str) -> Result<Arc<Feed>, Refusal> {
        let feed = self.peek(name).ok_or_else(|| {
            let w = self.hub.watching();
            Refusal::new(
                409,
                match w {
                    Some(w) => format!(
                        "this client watches {}, not {}: switch on /watch/{} (or POST /switch stream=NAME)",
                        untrusted(&w.name),
                        untrusted(name),
                        path_encode(name)
                    ),
                    None => "no stream is being watched yet".into(),
                },
            )
        })?;
        feed.touch();
        Ok(feed)
    }

    fn peek(&self, name: &str) -> Option<Arc<Feed>> {
        self.hub.feed().filter(|f| f.info.name == name)
    }

    fn switcher(&self) -> Option<&Sender<String>> {
        Some(&self.switch)
    }
}

/// Serve the client's HTTP output on `addr` in background threads; switch requests are
/// sent on `switch`. Returns the bound address.
pub fn serve(
    addr: SocketAddr,
    hub: Arc<Hub>,
    switch: Sender<String>,
) -> anyhow::Result<SocketAddr> {
    let server = serve_with(addr, hub, switch, Limits::default())?;
    let bound = server.local_addr();
    tracing::info!(%bound, "http output: open http://{bound}/ in a browser");
    Ok(bound)
}

/// [`serve`] within `limits`, returning the server (its counters, and a way to stop it).
pub fn serve_with(
    addr: SocketAddr,
    hub: Arc<Hub>,
    switch: Sender<String>,
    limits: Limits,
) -> anyhow::Result<httpd::Server> {
    let stats = hub.stats.clone();
    let source: Arc<dyn Source> = Arc::new(ClientSource {
        hub: hub.clone(),
        switch,
    });
    let (h1, h2, h3) = (hub.clone(), hub.clone(), hub);
    let router = router(source.clone())
        .get("/stream", move |_| stream_watched(&h1, None))
        .get("/stream.mjpeg", move |_| {
            stream_watched(&h2, Some(MediaKind::Mjpeg))
        })
        .get("/stream.ts", move |_| {
            stream_watched(&h3, Some(MediaKind::Ts))
        })
        .post("/switch", move |req| switch_to(source.as_ref(), req));
    httpd::serve(addr, router, limits, stats)
}

/// The routes both outputs serve (see the module documentation).
pub fn router(source: Arc<dyn Source>) -> Router {
    let (s1, s2, s3, s4, s5, s6, s7) = (
        source.clone(),
        source.clone(),
        source.clone(),
        source.clone(),
        source.clone(),
        source.clone(),
        source,
    );
    Router::new()
        .get("/", move |_| index(s1.as_ref()))
        .get("/streams", move |_| streams_json(s2.as_ref()))
        .get_under("/watch/", move |req| {
            with_name(req, "/watch/", |name| watch(s3.as_ref(), name))
        })
        .get_under("/facts/", move |req| {
            with_name(req, "/facts/", |name| facts(s4.as_ref(), name))
        })
        .get_under("/hls/", move |req| hls_route(s5.as_ref(), req))
        .get_under("/mjpeg/", move |req| {
            with_name(req, "/mjpeg/", |name| {
                stream_named(s6.as_ref(), name, MediaKind::Mjpeg)
            })
        })
        .get_under("/ts/", move |req| {
            with_name(req, "/ts/", |name| {
                stream_named(s7.as_ref(), name, MediaKind::Ts)
            })
        })
}

/// Call `f` with the stream name after `prefix` in the path (percent-decoded), or
/// answer 404 for an empty or malformed one.
fn with_name(req: &HttpRequest, prefix: &str, f: impl FnOnce(&str) -> Reply) -> Reply {
    match req.path.strip_prefix(prefix).and_then(path_decode) {
        Some(name) if !name.is_empty() => f(&name),
        _ => HttpResponse::text(404, format!("{prefix}NAME: which stream? see /\n")).into(),
    }
}

/// Percent-decode a path segment (`+` stays a plus); `None` if not UTF-8 or it holds a
/// `/` unescaped.
pub fn path_decode(s: &str) -> Option<String> {
    if s.contains('/') {
        return None;
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let v = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())?;
            out.push(v);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encode `s` as one path segment (everything but unreserved characters).
pub fn path_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn lookup_info(source: &dyn Source, name: &str) -> Option<StreamInfo> {
    source.catalogue().into_iter().find(|c| c.name == name)
}

fn streams_json(source: &dyn Source) -> Reply {
    let watching = source.watching();
    let v = serde_json::json!({
        "role": source.role(),
        "pop": source.pop(),
        "watching": watching.as_ref().map(|w| &w.name),
        "kind": watching.as_ref().map(|w| kind_name(w.kind)),
        "streams": source.catalogue().iter().map(|c| serde_json::json!({
            "name": c.name,
            "kind": kind_name(c.kind),
            "watch": format!("/watch/{}", path_encode(&c.name)),
        })).collect::<Vec<_>>(),
    });
    HttpResponse::new(200, "application/json", v.to_string()).into()
}

fn facts(source: &dyn Source, name: &str) -> Reply {
    let mut v = match source.peek(name) {
        Some(feed) => feed.facts(),
        None => serde_json::json!({"stream": name, "now_ms": wall_ms()}),
    };
    if let Some(o) = v.as_object_mut() {
        o.insert("role".into(), source.role().into());
        o.insert("pop".into(), source.pop().into());
        o.insert("extra".into(), source.extra_facts());
    }
    HttpResponse::new(200, "application/json", v.to_string()).into()
}

fn hls_route(source: &dyn Source, req: &HttpRequest) -> Reply {
    let rest = req.path.strip_prefix("/hls/").unwrap_or_default();
    let Some((name, file)) = rest.split_once('/') else {
        return HttpResponse::text(404, "use /hls/NAME/index.m3u8\n").into();
    };
    let Some(name) = path_decode(name).filter(|n| !n.is_empty()) else {
        return HttpResponse::text(404, "use /hls/NAME/index.m3u8\n").into();
    };
    let feed = match source.open(&name) {
        Ok(f) => f,
        Err(r) => return r.reply(),
    };
    if feed.info.kind != MediaKind::Ts {
        return HttpResponse::text(409, format!("{}\n", not_ts(&feed.info))).into();
    }
    let _busy = feed.busy();
    tracing::debug!(peer = %req.peer, path = %untrusted(&req.path), query = %untrusted(&req.query), "hls request");
    if file == "index.m3u8" {
        let q =
            |k: &str| HttpRequest::form_value(&req.query, k).and_then(|v| v.parse::<u64>().ok());
        let block = q("_HLS_msn").map(|msn| (msn, q("_HLS_part")));
        let window = q("window").map_or(HLS.window, |w| (w as usize).clamp(1, HLS.window));
        return match feed.playlist(block, window, &Player::of(req)) {
            Ok(text) => HttpResponse::new(200, "application/vnd.apple.mpegurl", text).into(),
            Err((status, why)) => HttpResponse::text(status, format!("{why}\n")).into(),
        };
    }
    match feed.segment(file) {
        Ok(b) => HttpResponse::new(200, "video/mp2t", b.to_vec()).into(),
        Err((status, why)) => HttpResponse::text(status, format!("{why}\n")).into(),
    }
}

fn stream_named(source: &dyn Source, name: &str, kind: MediaKind) -> Reply {
    let feed = match source.open(name) {
        Ok(f) => f,
        Err(r) => return r.reply(),
    };
    if feed.info.kind != kind {
        let other = match feed.info.kind {
            MediaKind::Mjpeg => "mjpeg",
            MediaKind::Ts => "ts",
        };
        return HttpResponse::text(
            409,
            format!(
                "{} is {}: use /{other}/{}\n",
                untrusted(name),
                kind_name(feed.info.kind),
                path_encode(name)
            ),
        )
        .into();
    }
    let (rx, guard) = feed.subscribe();
    Reply::Stream(Box::new(move |conn| {
        let _guard = guard;
        stream_to(conn, kind, &rx)
    }))
}

fn stream_watched(hub: &Hub, want: Option<MediaKind>) -> Reply {
    let Some(feed) = hub.feed() else {
        return HttpResponse::text(409, "no stream is being watched yet\n").into();
    };
    if want.is_some_and(|k| k != feed.info.kind) {
        return HttpResponse::text(
            409,
            format!(
                "stream {} is {}, not that kind\n",
                untrusted(&feed.info.name),
                kind_name(feed.info.kind)
            ),
        )
        .into();
    }
    let kind = feed.info.kind;
    let (rx, guard) = feed.subscribe();
    Reply::Stream(Box::new(move |conn| {
        let _guard = guard;
        stream_to(conn, kind, &rx)
    }))
}

fn stream_to(mut conn: StreamConn, kind: MediaKind, rx: &Receiver<Msg>) -> io::Result<()> {
    let ctype = match kind {
        MediaKind::Mjpeg => format!("multipart/x-mixed-replace; boundary={BOUNDARY}"),
        MediaKind::Ts => "video/mp2t".to_string(),
    };
    conn.send_head(200, &ctype)?;
    loop {
        match rx.recv_timeout(IDLE_END) {
            Ok(Msg::Frame(f)) if kind == MediaKind::Mjpeg => {
                let head = format!(
                    "--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
                    f.len()
                );
                conn.send(&[head.as_bytes(), &f, b"\r\n"])?;
            }
            Ok(Msg::Frame(f)) => conn.send(&[&f])?,
            // A switch to the other kind, the stream left, or no frame for a long time.
            Ok(Msg::End) | Err(RecvTimeoutError::Timeout) => return Ok(()),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "reader too slow: frames dropped for too long",
                ))
            }
        }
    }
}

fn switch_to(source: &dyn Source, req: &HttpRequest) -> Reply {
    let Some(switch) = source.switcher() else {
        return HttpResponse::text(404, "nothing to switch here\n").into();
    };
    if let Err(why) = httpd::check_same_origin(req) {
        tracing::info!(peer = %req.peer, %why, "switch refused");
        return HttpResponse::text(403, format!("switch refused: {why}\n")).into();
    }
    let form = String::from_utf8_lossy(&req.body);
    let name = HttpRequest::form_value(&form, "stream").unwrap_or_default();
    let name = name.trim();
    if name.is_empty() {
        return HttpResponse::text(400, "missing stream=NAME\n").into();
    }
    if lookup_info(source, name).is_none() {
        return HttpResponse::text(404, format!("no stream called {}\n", untrusted(name))).into();
    }
    tracing::info!(stream = %untrusted(name), "switch requested over http");
    match switch.try_send(name.to_string()) {
        Ok(()) => HttpResponse::text(303, "")
            .with_header("Location", format!("/watch/{}", path_encode(name)))
            .into(),
        Err(_) => HttpResponse::text(503, "the client is busy switching, retry\n").into(),
    }
}

const STYLE: &str = r#":root{color-scheme:dark}
body{font-family:system-ui,sans-serif;margin:0;background:#15171a;color:#e8e8e8;line-height:1.4}
main{max-width:960px;margin:0 auto;padding:1em}
a{color:#8cc8ff}
h1{font-size:1.4em;margin:.2em 0 .5em} h1 small,li small{color:#a9b1ba;font-weight:normal}
#player{display:block;width:100%;max-height:75vh;background:#000;object-fit:contain}
.note{background:#2a2f36;color:#f0f0f0;padding:.6em .8em;border-radius:4px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:.8em 0}
dl.facts dt{color:#a9b1ba} dl.facts dd{margin:0;font-variant-numeric:tabular-nums}
ul.streams{padding-left:1.2em} ul.streams li{margin:.25em 0}
form{display:inline} button{font:inherit;color:#15171a;background:#8cc8ff;border:0;border-radius:3px;padding:.1em .6em;cursor:pointer}
.players{color:#a9b1ba;font-size:.9em}"#;

fn html_page(title: &str, body: &str) -> Reply {
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\n<title>ott: {title}</title>\n<style>{STYLE}</style>\n</head><body><main>\n{body}\n</main></body></html>\n"
    );
    HttpResponse::new(200, "text/html; charset=utf-8", page)
        .with_header("Content-Security-Policy", "frame-ancestors 'none'")
        .with_header("X-Frame-Options", "DENY")
        .into()
}

/// The list item of stream `c`: a link to its page, or on a client, a switch button
/// for a stream it does not watch.
fn stream_item(source: &dyn Source, c: &StreamInfo, current: Option<&str>) -> String {
    let name = httpd::escape_html(&c.name);
    let kind = kind_label(c.kind);
    let here = current == Some(c.name.as_str());
    let link = format!(
        "<a href=\"/watch/{}\">{name}</a>",
        httpd::escape_html(&path_encode(&c.name))
    );
    let action = match (source.switcher(), source.watching()) {
        (Some(_), Some(w)) if w.name != c.name => format!(
            " <form method=\"post\" action=\"/switch\"><input type=\"hidden\" name=\"stream\" value=\"{name}\"><button>watch</button></form>"
        ),
        _ => String::new(),
    };
    format!(
        "<li>{link} <small>{kind}</small>{action}{}</li>\n",
        if here { " &larr; playing" } else { "" }
    )
}

fn kind_label(k: MediaKind) -> &'static str {
    match k {
        MediaKind::Mjpeg => "MJPEG",
        MediaKind::Ts => "H.264 / MPEG-TS",
    }
}

fn where_from(source: &dyn Source) -> String {
    match (source.role(), source.pop()) {
        ("pop", Some(p)) => format!("PoP {}", httpd::escape_html(&p)),
        (_, Some(p)) => format!("client, via PoP {}", httpd::escape_html(&p)),
        _ => "client".into(),
    }
}

fn index(source: &dyn Source) -> Reply {
    let streams = source.catalogue();
    let watching = source.watching();
    let list: String = streams
        .iter()
        .map(|c| stream_item(source, c, watching.as_ref().map(|w| w.name.as_str())))
        .collect();
    let body = if streams.is_empty() {
        "<p class=\"note\">No stream list yet: the PoP has not answered. This page reloads itself.</p><script>setTimeout(() => location.reload(), 2000)</script>".to_string()
    } else {
        format!("<ul class=\"streams\">\n{list}</ul>")
    };
    html_page(
        "streams",
        &format!(
            "<h1>Streams <small>{}</small></h1>\n{body}\n<p class=\"players\">For players: <code>/hls/NAME/index.m3u8</code> (H.264), <code>/ts/NAME</code>, <code>/mjpeg/NAME</code>.</p>",
            where_from(source)
        ),
    )
}

fn watch(source: &dyn Source, name: &str) -> Reply {
    let Some(info) = lookup_info(source, name) else {
        let known = source.catalogue();
        if known.is_empty() {
            return HttpResponse::text(503, "no stream list yet: retry in a moment\n").into();
        }
        return HttpResponse::text(
            404,
            format!("no stream called {}: see /\n", untrusted(name)),
        )
        .into();
    };
    let esc = httpd::escape_html(name);
    let enc = httpd::escape_html(&path_encode(name));
    // Join at once: the player's requests follow in a moment.
    let opened = source.open(name);
    let player = match (&opened, info.kind) {
        (Err(r), _) => {
            let w = source.watching().map(|w| w.name).unwrap_or_default();
            format!(
                "<p class=\"note\" id=\"player-note\">{}</p><p><form method=\"post\" action=\"/switch\"><input type=\"hidden\" name=\"stream\" value=\"{esc}\"><button>watch {esc} instead of {}</button></form></p>",
                httpd::escape_html(&r.message),
                httpd::escape_html(&w)
            )
        }
        (Ok(_), MediaKind::Mjpeg) => {
            format!("<img id=\"player\" src=\"/mjpeg/{enc}\" alt=\"{esc}\">")
        }
        (Ok(_), MediaKind::Ts) => format!(
            "<video id=\"player\" data-src=\"/hls/{enc}/index.m3u8?window=1\" muted autoplay playsinline controls preload=\"auto\"></video>"
        ),
    };
    let others: String = source
        .catalogue()
        .iter()
        .filter(|c| c.name != name)
        .map(|c| stream_item(source, c, None))
        .collect();
    let cfg = httpd::json_for_script(&serde_json::json!({
        "name": name,
        "kind": kind_name(info.kind),
        "facts": format!("/facts/{}", path_encode(name)),
        "watching": source.watching().map(|w| w.name),
        "client": source.switcher().is_some(),
    }));
    let body = format!(
        r#"<h1>{esc} <small>{kind}</small></h1>
{player}
<p class="note" id="note" hidden></p>
<dl class="facts">
<dt>from</dt><dd id="f-pop">{from}</dd>
<dt>fps</dt><dd id="f-fps">…</dd>
<dt>stalls</dt><dd id="f-stalls">…</dd>
<dt>latency</dt><dd id="f-latency">…</dd>
<dt>first picture</dt><dd id="f-first">…</dd>
</dl>
<h2>Other streams</h2>
<ul class="streams">
{others}</ul>
<p class="players">In a player: <a href="/hls/{enc}/index.m3u8">HLS</a> · <a href="/ts/{enc}">MPEG-TS</a> · <a href="/mjpeg/{enc}">MJPEG</a> (whichever fits the stream) · <a href="/">all streams</a></p>
<script>
const cfg = {cfg};
{SCRIPT}
</script>"#,
        kind = kind_label(info.kind),
        from = where_from(source),
    );
    html_page(&esc, &body)
}

/// The page's script: muted autoplay, the first-picture time, the live facts, and on a
/// client a reload when it switches stream.
const SCRIPT: &str = r#"window.ott = {firstPictureMs: null, latencyS: null, facts: null};
const player = document.getElementById('player');
const note = document.getElementById('note');
const show = (id, text) => { const e = document.getElementById(id); if (e) e.textContent = text; };
const firstPicture = () => {
  if (ott.firstPictureMs !== null) return;
  ott.firstPictureMs = Math.round(performance.now());
  show('f-first', (ott.firstPictureMs / 1000).toFixed(2) + ' s after opening the page');
};
if (player && player.tagName === 'VIDEO') {
  // A token of this page's player: its playlist reloads wait for something new.
  const token = Array.from(crypto.getRandomValues(new Uint8Array(8)), b => b.toString(16).padStart(2, '0')).join('');
  player.src = player.dataset.src + '&s=' + token;
  if (!player.canPlayType('application/vnd.apple.mpegurl')) {
    note.hidden = false;
    note.textContent = 'This browser does not play HLS by itself (Safari, Chrome, Edge and phones do): open the HLS or MPEG-TS link below in VLC or mpv.';
  }
  const onFrame = () => firstPicture();
  if ('requestVideoFrameCallback' in player) player.requestVideoFrameCallback(onFrame);
  else player.addEventListener('playing', firstPicture, {once: true});
  player.addEventListener('error', () => { note.hidden = false; note.textContent = 'The player stopped: ' + (player.error ? player.error.message || player.error.code : 'error') + '. Reload the page to retry.'; });
  const start = () => player.play().catch(() => {});
  start();
  player.addEventListener('canplay', start);
} else if (player && player.tagName === 'IMG') {
  const poll = () => { if (player.naturalWidth > 0) firstPicture(); else setTimeout(poll, 50); };
  poll();
}
async function tick() {
  try {
    const t0 = Date.now();
    const r = await fetch(cfg.facts, {cache: 'no-store'});
    const f = await r.json();
    const t1 = Date.now();
    ott.facts = f;
    // The server's clock minus ours, from the middle of the request.
    const offset = f.now_ms - (t0 + t1) / 2;
    if (f.pop) show('f-pop', (f.role === 'pop' ? 'PoP ' : 'client, via PoP ') + f.pop);
    if (f.fps !== undefined) show('f-fps', f.fps.toFixed(1) + ' (' + f.frames + ' frames received)');
    if (f.stalls !== undefined) show('f-stalls', String(f.stalls));
    const b = player && player.tagName === 'VIDEO' ? player.buffered : null;
    if (b && b.length && f.hls && f.hls.newest_done_ms && !player.paused) {
      // The end of what the player holds is (about) the end of the newest complete
      // segment, which the PoP completed at newest_done_ms: the picture shown is
      // that much older, plus what the player holds ahead of it.
      const nowThere = Date.now() + offset;
      const lat = (b.end(b.length - 1) - player.currentTime) + (nowThere - f.hls.newest_done_ms) / 1000;
      ott.latencyS = lat;
      show('f-latency', '≈ ' + lat.toFixed(1) + ' s behind the ' + (f.role === 'pop' ? 'PoP' : 'client') + "'s reception" + (f.extra && f.extra.path_latency_ms != null ? ' (+ ' + f.extra.path_latency_ms.toFixed(1) + ' ms from the server to the PoP)' : ''));
    } else if (player && player.tagName === 'IMG' && f.since_last_frame_ms !== undefined) {
      show('f-latency', 'frames are shown as they arrive');
    }
    if (cfg.client && f.role === 'client') {
      const s = await (await fetch('/streams', {cache: 'no-store'})).json();
      if (s.watching && s.watching !== cfg.watching) location.href = '/watch/' + encodeURIComponent(s.watching);
    }
  } catch (e) {}
}
tick();
setInterval(tick, 1000);"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn counter() -> Arc<AtomicU64> {
        Arc::new(AtomicU64::new(0))
    }

    fn frames(rx: &Receiver<Msg>) -> Vec<u8> {
        rx.try_iter()
            .filter_map(|m| match m {
                Msg::Frame(f) => f.first().copied(),
                Msg::End => None,
            })
            .collect()
    }

    #[test]
    fn test_hub_starts_new_subscribers_at_the_last_keyframe() {
        let hub = Hub::new();
        assert!(hub.feed().is_none());
        let ts = StreamInfo::new("t", MediaKind::Ts, 0);
        hub.set_watching(&ts);
        for (i, key) in [(1u8, true), (2, false), (3, true), (4, false)] {
            hub.frame(&Bytes::from(vec![i]), key);
        }
        let feed = hub.feed().expect("watching");
        let (rx, _g) = feed.subscribe();
        assert_eq!(frames(&rx), [3, 4]);
        // A switch to another TS stream goes on on the same response...
        hub.set_watching(&StreamInfo::new("t2", MediaKind::Ts, 0));
        hub.frame(&Bytes::from(vec![5]), true);
        assert_eq!(frames(&rx), [5]);
        // ... a switch to the other kind ends it.
        hub.set_watching(&StreamInfo::new("m", MediaKind::Mjpeg, 0));
        assert!(matches!(rx.try_recv(), Ok(Msg::End)));
    }

    #[test]
    fn test_a_reader_that_never_reads_is_dropped_and_its_queue_is_bounded() {
        let dropped = counter();
        let feed = Feed::new(StreamInfo::new("t", MediaKind::Ts, 0), dropped.clone());
        feed.frame(&Bytes::from_static(b"k"), true);
        let (rx, _g) = feed.subscribe();
        for _ in 0..QUEUE * 3 {
            feed.frame(&Bytes::from_static(b"f"), false);
        }
        // One start frame, then QUEUE live ones; the rest dropped, not queued.
        assert_eq!(rx.len(), 1 + QUEUE);
        assert_eq!(dropped.load(Ordering::Relaxed), 2 * QUEUE as u64);
        assert_eq!(
            feed.lock().subs.len(),
            1,
            "lagging, not yet for SLOW_READER"
        );
        // Lagging for longer than SLOW_READER: the subscription goes.
        if let Some(sub) = feed.lock().subs.first_mut() {
            sub.lagging_since = Instant::now().checked_sub(SLOW_READER);
        }
        feed.frame(&Bytes::from_static(b"f"), false);
        assert!(feed.lock().subs.is_empty());
        // The queue is written out, then the response ends as a slow reader's.
        assert_eq!(rx.try_iter().count(), 1 + QUEUE);
        assert!(matches!(
            rx.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        ));
    }

    #[test]
    fn test_viewers_and_idleness() {
        let feed = Feed::new(StreamInfo::new("t", MediaKind::Ts, 0), counter());
        assert_eq!(feed.viewers(), 0);
        let (_rx, guard) = feed.subscribe();
        assert_eq!(feed.viewers(), 1);
        assert_eq!(feed.idle_for(Instant::now()), None);
        drop(guard);
        assert_eq!(feed.viewers(), 0);
        let busy = feed.busy();
        assert_eq!(feed.idle_for(Instant::now()), None);
        drop(busy);
        let later = Instant::now() + Duration::from_secs(5);
        assert!(feed
            .idle_for(later)
            .is_some_and(|d| d >= Duration::from_secs(4)));
    }

    #[test]
    fn test_an_ended_feed_does_not_keep_hls_requests_waiting() {
        let feed = Feed::new(StreamInfo::new("t", MediaKind::Ts, 0), counter());
        feed.end();
        let t0 = Instant::now();
        assert_eq!(
            feed.playlist(None, 6, &Player::Addr(IpAddr::from([127, 0, 0, 1])))
                .map_err(|e| e.0),
            Err(503)
        );
        assert_eq!(feed.segment("s0.ts").map_err(|e| e.0), Err(503));
        assert!(t0.elapsed() < HLS_WAIT);
        let m = Feed::new(StreamInfo::new("m", MediaKind::Mjpeg, 0), counter());
        let t0 = Instant::now();
        assert_eq!(
            m.playlist(None, 6, &Player::Addr(IpAddr::from([127, 0, 0, 1])))
                .map_err(|e| e.0),
            Err(409)
        );
        assert!(t0.elapsed() < HLS_WAIT, "at once");
    }

    #[test]
    fn test_a_player_that_has_everything_waits_for_the_next_segment() {
        let feed = Feed::new(StreamInfo::new("t", MediaKind::Ts, 0), counter());
        let gop = |feed: &Feed| {
            for i in 0..50 {
                feed.frame(&Bytes::from_static(&[0x47; 188]), i == 0);
            }
        };
        gop(&feed);
        gop(&feed);
        let a = Player::Token("a".into());
        let first = feed.playlist(None, 6, &a).expect("a segment");
        assert!(
            first.contains("s0.ts") && !first.contains("s1.ts"),
            "{first}"
        );
        // Another player gets it at once; the same one waits for something new.
        let t0 = Instant::now();
        let other = feed.playlist(None, 6, &Player::Addr(IpAddr::from([127, 0, 0, 2])));
        assert_eq!(other.as_deref(), Ok(first.as_str()));
        assert!(t0.elapsed() < Duration::from_millis(500));
        let (tx, rx) = crossbeam_channel::bounded(1);
        let waiting = feed.clone();
        let th = std::thread::spawn(move || {
            let _ = tx.send(waiting.playlist(None, 6, &Player::Token("a".into())));
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "a reload with nothing new waits"
        );
        gop(&feed);
        let next = rx
            .recv_timeout(HLS_WAIT)
            .expect("answered once a segment completes")
            .expect("a playlist");
        assert!(next.contains("s1.ts"), "{next}");
        let _ = th.join();
        // A blocking reload (LL-HLS) names what it waits for.
        let t0 = Instant::now();
        assert!(feed.playlist(Some((1, None)), 6, &a).is_ok());
        assert!(t0.elapsed() < Duration::from_millis(500));
        assert!(feed
            .playlist(Some((1, Some(0))), 1, &a)
            .is_ok_and(|p| !p.contains("s0.ts")));
    }

    #[test]
    fn test_path_segments() {
        for name in ["news", "a b/c+d", "</script>", "é"] {
            let enc = path_encode(name);
            assert!(!enc.contains(['/', ' ', '<', '+']), "{enc}");
            assert_eq!(path_decode(&enc).as_deref(), Some(name));
        }
        assert_eq!(path_decode("a+b").as_deref(), Some("a+b"));
        assert_eq!(path_decode("a/b"), None);
        assert_eq!(path_decode("%zz"), None);
        assert_eq!(path_decode("%ff"), None);
    }
}
