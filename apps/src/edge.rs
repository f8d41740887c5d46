//! A PoP's HTTP edge (`ott-node --http ADDR`): the PoP serves browsers and players
//! directly, on the routes of [`crate::http`].
//!
//! The edge is a viewer of its own PoP: for each stream an HTTP viewer asks for, it runs
//! the client's runtime ([`crate::viewer::run_embedded`]) in a thread, attached to the
//! PoP's control address over loopback, and serves what arrives. So the PoP joins the
//! stream in the overlay exactly as it does for any client (soft-state `Join`, instant
//! start from its cached GOP, NACK recovery, playout), and leaves it the same way: when
//! the stream has had no HTTP viewer for [`LINGER`] (no streaming response open, no HLS
//! request in progress or made since), the edge's viewer stops and sends `Leave`. A
//! tap inside the forwarder would save one loopback copy per datagram, but would need
//! a second reassembly, recovery and join/leave path in the data plane; this way the
//! data plane does not know the edge exists.
//!
//! One more embedded viewer that watches nothing keeps the catalogue (the stream list
//! and each stream's kind), and the PoP's path latency from the server.
//!
//! Bounds: at most [`MAX_STREAMS`] streams joined at once (then `503`), the HTTP
//! server's caps ([`crate::httpd::Limits`]), and per stream the bounds of
//! [`crate::http::Feed`] (queues, GOP start, HLS window).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender};
use ott_proto::{untrusted, StreamInfo};

use crate::ctrlio::StatusQuery;
use crate::http::{Feed, Hub, Refusal, Source};
use crate::httpd::{self, HttpStats, Limits};
use crate::status::StatusSource;

/// A stream with no HTTP viewer for this long is left.
pub const LINGER: Duration = Duration::from_secs(8);
/// Most streams the edge has joined at once.
pub const MAX_STREAMS: usize = 32;
/// How often idle streams are looked for.
const REAP_EVERY: Duration = Duration::from_millis(250);

struct Joined {
    hub: Arc<Hub>,
    feed: Arc<Feed>,
    /// Dropping it stops the viewer.
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

/// A PoP's HTTP edge; see the module documentation.
pub struct Edge {
    pop_id: String,
    pop_ctrl: SocketAddr,
    bind: SocketAddr,
    linger: Duration,
    /// The viewer that only keeps the catalogue.
    catalogue: Arc<Hub>,
    catalogue_status: Sender<StatusQuery>,
    joined: Mutex<HashMap<String, Joined>>,
    /// Viewers stopping: joined when they end.
    stopping: Mutex<Vec<JoinHandle<()>>>,
    dropped: Arc<AtomicU64>,
    stats: Arc<HttpStats>,
}

/// Where a viewer of the PoP at `ctrl` sends from, and where it sends to: its IP (or
/// loopback when the PoP binds every address), any port.
fn local_addrs(ctrl: SocketAddr) -> (SocketAddr, SocketAddr) {
    let ip = if ctrl.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        ctrl.ip()
    };
    (SocketAddr::new(ip, ctrl.port()), SocketAddr::new(ip, 0))
}

impl Edge {
    /// Start the edge of PoP `pop_id` (control socket at `pop_ctrl`) and serve HTTP on
    /// `http`, leaving streams [`LINGER`] after their last viewer. Returns the edge and
    /// the address bound.
    pub fn start(
        pop_id: &str,
        pop_ctrl: SocketAddr,
        http: SocketAddr,
    ) -> anyhow::Result<(Arc<Edge>, SocketAddr)> {
        Self::start_with(pop_id, pop_ctrl, http, LINGER, Limits::default())
    }

    /// [`Edge::start`] with another linger time and HTTP limits.
    pub fn start_with(
        pop_id: &str,
        pop_ctrl: SocketAddr,
        http: SocketAddr,
        linger: Duration,
        limits: Limits,
    ) -> anyhow::Result<(Arc<Edge>, SocketAddr)> {
        let (pop_ctrl, bind) = local_addrs(pop_ctrl);
        let stats = Arc::new(HttpStats::new("edge"));
        let dropped = Arc::new(AtomicU64::new(0));
        let catalogue = Arc::new(Hub::with_counter(dropped.clone(), stats.clone()));
        let (status_tx, status_rx) = crossbeam_channel::bounded(4);
        let edge = Arc::new(Edge {
            pop_id: pop_id.to_string(),
            pop_ctrl,
            bind,
            linger,
            catalogue: catalogue.clone(),
            catalogue_status: status_tx,
            joined: Mutex::new(HashMap::new()),
            stopping: Mutex::new(Vec::new()),
            dropped,
            stats: stats.clone(),
        });
        let pop = (edge.pop_id.clone(), pop_ctrl);
        thread::Builder::new()
            .name("edge-catalogue".into())
            .spawn(move || {
                // Never stopped: it lasts as long as the program.
                let (_keep, stop) = crossbeam_channel::bounded::<()>(1);
                let span = tracing::info_span!("edge");
                let _e = span.enter();
                if let Err(e) =
                    crate::viewer::run_embedded(pop, bind, None, catalogue, &stop, &status_rx)
                {
                    tracing::warn!(error = %format!("{e:#}"), "edge: the stream list viewer stopped; the page lists no stream");
                }
            })
            .context("cannot start the edge's stream list thread")?;
        let reaper = Arc::downgrade(&edge);
        thread::Builder::new()
            .name("edge-reaper".into())
            .spawn(move || loop {
                thread::sleep(REAP_EVERY);
                match reaper.upgrade() {
                    Some(e) => e.reap(Instant::now()),
                    None => return,
                }
            })
            .context("cannot start the edge's reaper thread")?;
        let source: Arc<dyn Source> = edge.clone();
        let server = httpd::serve(http, crate::http::router(source), limits, stats)?;
        let bound = server.local_addr();
        tracing::info!(%bound, "http edge: open http://{bound}/ in a browser");
        Ok((edge, bound))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Joined>> {
        self.joined.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Streams joined right now, by name.
    pub fn joined(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// The counters of the edge's HTTP server.
    pub fn http_stats(&self) -> &Arc<HttpStats> {
        &self.stats
    }

    /// Leave the streams idle for the linger time, and forget viewers that ended.
    fn reap(&self, now: Instant) {
        let mut joined = self.lock();
        let gone: Vec<String> = joined
            .iter()
            .filter(|(_, j)| {
                j.thread.is_finished() || j.feed.idle_for(now).is_some_and(|d| d >= self.linger)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut stopping = Vec::new();
        for name in gone {
            if let Some(j) = joined.remove(&name) {
                tracing::info!(stream = %untrusted(&name), "edge: no HTTP viewer left: leaving the stream");
                drop(j.stop);
                j.feed.end();
                drop(j.hub);
                stopping.push(j.thread);
            }
        }
        drop(joined);
        let mut s = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
        s.extend(stopping);
        let (done, running): (Vec<_>, Vec<_>) = s.drain(..).partition(|t| t.is_finished());
        *s = running;
        for t in done {
            let _ = t.join();
        }
    }

    fn join(&self, info: StreamInfo) -> Result<Arc<Feed>, Refusal> {
        let mut joined = self.lock();
        if let Some(j) = joined.get(&info.name) {
            if !j.thread.is_finished() {
                j.feed.touch();
                return Ok(j.feed.clone());
            }
        }
        if joined.len() >= MAX_STREAMS {
            return Err(Refusal::new(
                503,
                format!("this PoP serves {MAX_STREAMS} streams over HTTP already: retry later"),
            ));
        }
        let feed = Feed::new(info.clone(), self.dropped.clone());
        let hub = Arc::new(Hub::for_feed(
            feed.clone(),
            self.dropped.clone(),
            self.stats.clone(),
        ));
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let (_status_tx, status_rx): (Sender<StatusQuery>, Receiver<StatusQuery>) =
            crossbeam_channel::bounded(1);
        let pop = (self.pop_id.clone(), self.pop_ctrl);
        let bind = self.bind;
        let name = info.name.clone();
        let viewer_hub = hub.clone();
        let thread = thread::Builder::new()
            .name("edge-viewer".into())
            .spawn(move || {
                let span = tracing::info_span!("edge", stream = %untrusted(&name));
                let _e = span.enter();
                if let Err(e) = crate::viewer::run_embedded(
                    pop,
                    bind,
                    Some(name),
                    viewer_hub,
                    &stop_rx,
                    &status_rx,
                ) {
                    tracing::warn!(error = %format!("{e:#}"), "edge: viewer stopped");
                }
            })
            .map_err(|e| Refusal::new(503, format!("cannot start a viewer thread: {e}")))?;
        tracing::info!(stream = %untrusted(&info.name), "edge: first HTTP viewer: joining the stream");
        joined.insert(
            info.name.clone(),
            Joined {
                hub,
                feed: feed.clone(),
                stop: stop_tx,
                thread,
            },
        );
        Ok(feed)
    }
}

impl Source for Edge {
    fn role(&self) -> &'static str {
        "pop"
    }

    fn pop(&self) -> Option<String> {
        Some(self.pop_id.clone())
    }

    fn catalogue(&self) -> Vec<StreamInfo> {
        self.catalogue.catalogue()
    }

    fn watching(&self) -> Option<StreamInfo> {
        None
    }

    fn open(&self, name: &str) -> Result<Arc<Feed>, Refusal> {
        let catalogue = self.catalogue();
        if catalogue.is_empty() {
            return Err(Refusal::new(
                503,
                "this PoP has no stream list yet (is a server up?): retry in a moment",
            ));
        }
        let Some(info) = catalogue.into_iter().find(|c| c.name == name) else {
            return Err(Refusal::new(
                404,
                format!("no stream called {}: see /", untrusted(name)),
            ));
        };
        self.join(info)
    }

    fn peek(&self, name: &str) -> Option<Arc<Feed>> {
        self.lock().get(name).map(|j| j.feed.clone())
    }

    fn extra_facts(&self) -> serde_json::Value {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let latency = self
            .catalogue_status
            .try_send(tx)
            .ok()
            .and_then(|()| rx.recv_timeout(Duration::from_millis(500)).ok())
            .and_then(|v| {
                v["pops"]
                    .as_array()
                    .and_then(|p| p.first())
                    .and_then(|p| p["path_latency_ms"].as_f64())
            });
        serde_json::json!({ "path_latency_ms": latency })
    }
}

/// The edge's part of the node's `/status` and `/metrics`: its HTTP counters, the frames
/// dropped for slow readers, and the streams it has joined.
pub fn with_edge(source: Arc<dyn StatusSource>, edge: Option<Arc<Edge>>) -> Arc<dyn StatusSource> {
    match edge {
        Some(edge) => Arc::new(WithEdge {
            inner: source,
            edge,
        }),
        None => source,
    }
}

struct WithEdge {
    inner: Arc<dyn StatusSource>,
    edge: Arc<Edge>,
}

impl StatusSource for WithEdge {
    fn status(&self) -> serde_json::Value {
        let mut v = self.inner.status();
        if let Some(o) = v.as_object_mut() {
            let mut http = serde_json::to_value(self.edge.stats.snapshot()).unwrap_or_default();
            if let Some(h) = http.as_object_mut() {
                h.insert(
                    "frames_dropped".into(),
                    self.edge
                        .dropped
                        .load(std::sync::atomic::Ordering::Relaxed)
                        .into(),
                );
                h.insert("joined".into(), self.edge.joined().into());
            }
            o.insert("http".into(), http);
        }
        v
    }

    fn metrics(&self) -> String {
        self.inner.metrics()
            + &crate::http::dropped_metric(
                self.edge.stats.name(),
                self.edge.dropped.load(std::sync::atomic::Ordering::Relaxed),
            )
    }

    fn http_stats(&self) -> Vec<Arc<HttpStats>> {
        let mut v = self.inner.http_stats();
        v.push(self.edge.stats.clone());
        v
    }
}
