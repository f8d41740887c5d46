//! The client's `--http ADDR` output: a page listing the streams with a player, and the
//! stream being watched for browsers and players.
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | HTML page: the streams (a button switches), and the player: an `<img>` for MJPEG, the URL to open in ffplay, VLC or mpv for MPEG-TS |
//! | `GET /stream` | the stream watched: MJPEG as `multipart/x-mixed-replace` (one `image/jpeg` part per frame), MPEG-TS as `video/mp2t` |
//! | `GET /stream.mjpeg`, `GET /stream.ts` | the same, only while the stream watched is of that kind (else 409) |
//! | `GET /streams` | JSON: the stream watched and the catalogue |
//! | `POST /switch` (form `stream=NAME`) | switch to a stream of the catalogue, then redirect to `/` |
//!
//! `/switch` changes what the client does, so it is `POST` only (`GET` gets 405) and
//! same-origin only ([`httpd::check_same_origin`]: a request with an `Origin` or
//! `Referer` must come from this page; one with neither, from curl or a script, is
//! taken), else 403. Everything the page shows that came from the network (stream
//! names) is escaped for where it goes: HTML text and attributes, and the JSON in its
//! `<script>`; the page may not be framed.
//!
//! A stream response starts at the latest decodable start the client has (the last JPEG;
//! for TS the units since the last keyframe), then follows live. It ends when the
//! client switches to a stream of the other kind (the page reloads itself), and a
//! TS-to-TS or MJPEG-to-MJPEG switch continues on the same response from the new
//! stream's first keyframe. A slow reader loses frames (counted), never stalls the
//! client; one that keeps losing them for [`SLOW_READER`], or does not take a frame
//! within the server's write timeout, is dropped.
//!
//! Served by [`crate::httpd`] within its default limits.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use ott_proto::{untrusted, MediaKind, StreamInfo};

use crate::httpd::{self, HttpStats, Limits, Reply, Request, Response, Router, StreamConn};
use crate::status::StatusSource;

/// Frames queued per streaming response before frames are dropped for it.
const QUEUE: usize = 64;
/// Most bytes of the latest decodable start kept for new HTTP viewers.
const MAX_START: usize = 8 << 20;
/// A streaming response whose queue stays full this long is dropped.
pub const SLOW_READER: Duration = Duration::from_secs(10);
/// A streaming response ends after this long without a frame.
const IDLE_END: Duration = Duration::from_secs(30);
const BOUNDARY: &str = "ottframe";

enum Msg {
    Frame(Bytes),
    End,
}

struct Sub {
    kind: MediaKind,
    tx: Sender<Msg>,
    /// Since when its queue has been full (frames dropped), if it is.
    lagging_since: Option<Instant>,
}

#[derive(Default)]
struct State {
    watching: Option<StreamInfo>,
    catalogue: Vec<StreamInfo>,
    subs: Vec<Sub>,
    /// Frames since the last keyframe of the stream watched.
    start: VecDeque<Bytes>,
    start_bytes: usize,
}

/// What the HTTP output serves; the viewer feeds it.
pub struct Hub {
    state: Mutex<State>,
    stats: Arc<HttpStats>,
    /// Frames not queued for a slow reader.
    dropped: AtomicU64,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            stats: Arc::new(HttpStats::new("http")),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client now watches `info`: responses of the other kind end; the others go on
    /// with the new stream from its first keyframe.
    pub fn set_watching(&self, info: &StreamInfo) {
        let mut s = self.lock();
        s.subs.retain(|sub| {
            if sub.kind != info.kind {
                let _ = sub.tx.try_send(Msg::End);
                false
            } else {
                true
            }
        });
        s.start.clear();
        s.start_bytes = 0;
        s.watching = Some(info.clone());
    }

    /// The catalogue changed.
    pub fn set_catalogue(&self, streams: &[StreamInfo]) {
        self.lock().catalogue = streams.to_vec();
    }

    /// A frame of the stream watched, written in order; `keyframe` when it is a
    /// decodable start. The viewer only passes frames from a keyframe on.
    pub fn frame(&self, data: &Bytes, keyframe: bool) {
        let now = Instant::now();
        let mut s = self.lock();
        if keyframe {
            s.start.clear();
            s.start_bytes = 0;
        }
        if s.start_bytes + data.len() <= MAX_START {
            s.start_bytes += data.len();
            s.start.push_back(data.clone());
        }
        let mut dropped = 0;
        s.subs
            .retain_mut(|sub| match sub.tx.try_send(Msg::Frame(data.clone())) {
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
            });
        drop(s);
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
    }

    /// Subscribe to the stream watched if it is of `want` (any kind if `None`): its kind
    /// and a receiver that first gets the latest decodable start.
    fn subscribe(&self, want: Option<MediaKind>) -> Result<(MediaKind, Receiver<Msg>), String> {
        let mut s = self.lock();
        let Some(w) = s.watching.clone() else {
            return Err("no stream is being watched yet".into());
        };
        if want.is_some_and(|k| k != w.kind) {
            return Err(format!(
                "stream {} is {}, not that kind",
                w.name,
                kind_name(w.kind)
            ));
        }
        let (tx, rx) = crossbeam_channel::bounded(QUEUE + s.start.len());
        for f in &s.start {
            let _ = tx.try_send(Msg::Frame(f.clone()));
        }
        s.subs.push(Sub {
            kind: w.kind,
            tx,
            lagging_since: None,
        });
        Ok((w.kind, rx))
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
        format!(
            "# HELP ott_http_frames_dropped_total Frames not sent to slow HTTP readers.\n# TYPE ott_http_frames_dropped_total counter\nott_http_frames_dropped_total{{server=\"{}\"}} {}\n",
            self.stats.name(),
            self.dropped_frames()
        )
    }
}

fn kind_name(k: MediaKind) -> &'static str {
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

/// Serve the HTTP output on `addr` in background threads; switch requests are sent on
/// `switch`. Returns the bound address.
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
    httpd::serve(addr, router(hub, switch), limits, stats)
}

fn router(hub: Arc<Hub>, switch: Sender<String>) -> Router {
    let (h1, h2, h3, h4, h5, h6) = (
        hub.clone(),
        hub.clone(),
        hub.clone(),
        hub.clone(),
        hub.clone(),
        hub,
    );
    Router::new()
        .get("/", move |req| page(&h1, req))
        .get("/streams", move |_| streams_json(&h2))
        .get("/stream", move |_| stream(&h3, None))
        .get("/stream.mjpeg", move |_| {
            stream(&h4, Some(MediaKind::Mjpeg))
        })
        .get("/stream.ts", move |_| stream(&h5, Some(MediaKind::Ts)))
        .post("/switch", move |req| switch_to(&h6, &switch, req))
}

fn streams_json(hub: &Hub) -> Reply {
    let s = hub.lock();
    let v = serde_json::json!({
        "watching": s.watching.as_ref().map(|w| &w.name),
        "kind": s.watching.as_ref().map(|w| kind_name(w.kind)),
        "streams": s.catalogue.iter().map(|c| serde_json::json!({"name": c.name, "kind": kind_name(c.kind)})).collect::<Vec<_>>(),
        "dropped_frames": hub.dropped_frames(),
    });
    drop(s);
    Response::new(200, "application/json", v.to_string()).into()
}

fn switch_to(hub: &Hub, switch: &Sender<String>, req: &Request) -> Reply {
    if let Err(why) = httpd::check_same_origin(req) {
        tracing::info!(peer = %req.peer, %why, "switch refused");
        return Response::text(403, format!("switch refused: {why}\n")).into();
    }
    let form = String::from_utf8_lossy(&req.body);
    let name = Request::form_value(&form, "stream").unwrap_or_default();
    let name = name.trim();
    if name.is_empty() {
        return Response::text(400, "missing stream=NAME\n").into();
    }
    if !hub.lock().catalogue.iter().any(|c| c.name == name) {
        return Response::text(404, format!("no stream called {}\n", untrusted(name))).into();
    }
    tracing::info!(stream = %untrusted(name), "switch requested over http");
    match switch.try_send(name.to_string()) {
        Ok(()) => Response::text(303, "").with_header("Location", "/").into(),
        Err(_) => Response::text(503, "the client is busy switching, retry\n").into(),
    }
}

fn stream(hub: &Hub, want: Option<MediaKind>) -> Reply {
    match hub.subscribe(want) {
        Ok((kind, rx)) => Reply::Stream(Box::new(move |conn| stream_to(conn, kind, &rx))),
        Err(e) => Response::text(409, format!("{e}\n")).into(),
    }
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
            // A switch to the other kind, or no frame for a long time.
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

fn page(hub: &Hub, req: &Request) -> Reply {
    let s = hub.lock();
    let mut list = String::new();
    for c in &s.catalogue {
        let name = httpd::escape_html(&c.name);
        let current = s.watching.as_ref().is_some_and(|w| w.name == c.name);
        list.push_str(&format!(
            "<li><form method=\"post\" action=\"/switch\"><input type=\"hidden\" name=\"stream\" value=\"{name}\"><button{}>{name}</button> <small>{}</small>{}</form></li>\n",
            if current { " disabled" } else { "" },
            kind_name(c.kind),
            if current { " &larr; watching" } else { "" },
        ));
    }
    // The address the browser used, if it is an address (a name could be anyone's).
    let host = req
        .header("host")
        .map(str::trim)
        .filter(|h| httpd::host_is_address(h))
        .unwrap_or("ADDRESS:PORT")
        .to_string();
    let player = match &s.watching {
        Some(w) if w.kind == MediaKind::Mjpeg => format!(
            "<img id=\"player\" src=\"/stream.mjpeg\" alt=\"{}\">",
            httpd::escape_html(&w.name)
        ),
        Some(w) => format!(
            "<p id=\"player\">{} is MPEG-TS, which browsers do not play: open <a href=\"/stream.ts\">http://{host}/stream.ts</a> with <code>ffplay</code>, <code>mpv</code> or VLC.</p>",
            httpd::escape_html(&w.name),
            host = httpd::escape_html(&host),
        ),
        None => "<p id=\"player\">Waiting for the stream…</p>".to_string(),
    };
    let title = s
        .watching
        .as_ref()
        .map(|w| httpd::escape_html(&w.name))
        .unwrap_or_else(|| "ott".into());
    let kind = s.watching.as_ref().map(|w| kind_name(w.kind)).unwrap_or("");
    let shown = httpd::json_for_script(&s.watching.as_ref().map(|w| &w.name));
    drop(s);
    let body = format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>ott: {title}</title>
<style>body{{font-family:sans-serif;margin:1em}} #player{{max-width:100%;background:#000}} li{{margin:.2em 0}} form{{display:inline}}</style>
</head><body>
<h1>{title} <small>{kind}</small></h1>
{player}
<h2>Streams</h2>
<ul>
{list}</ul>
<script>
// Reload when the stream watched changes (a switch from another tab or from stdin).
const shown = {shown};
setInterval(() => fetch('/streams').then(r => r.json()).then(s => {{ if (s.watching !== shown) location.reload(); }}).catch(() => {{}}), 2000);
</script>
</body></html>
"#
    );
    Response::new(200, "text/html; charset=utf-8", body)
        .with_header("Content-Security-Policy", "frame-ancestors 'none'")
        .with_header("X-Frame-Options", "DENY")
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_hub_starts_new_subscribers_at_the_last_keyframe() {
        let hub = Hub::new();
        assert!(hub.subscribe(None).is_err());
        let ts = StreamInfo::new("t", MediaKind::Ts, 0);
        hub.set_watching(&ts);
        for (i, key) in [(1u8, true), (2, false), (3, true), (4, false)] {
            hub.frame(&Bytes::from(vec![i]), key);
        }
        let (kind, rx) = hub.subscribe(None).expect("watching");
        assert_eq!(kind, MediaKind::Ts);
        let got: Vec<u8> = rx
            .try_iter()
            .filter_map(|m| match m {
                Msg::Frame(f) => f.first().copied(),
                Msg::End => None,
            })
            .collect();
        assert_eq!(got, [3, 4]);
        assert!(hub.subscribe(Some(MediaKind::Mjpeg)).is_err());
        // A switch to the other kind ends the response.
        hub.set_watching(&StreamInfo::new("m", MediaKind::Mjpeg, 0));
        assert!(matches!(rx.try_recv(), Ok(Msg::End)));
    }

    #[test]
    fn test_a_reader_that_never_reads_is_dropped_and_its_queue_is_bounded() {
        let hub = Hub::new();
        hub.set_watching(&StreamInfo::new("t", MediaKind::Ts, 0));
        hub.frame(&Bytes::from_static(b"k"), true);
        let (_, rx) = hub.subscribe(None).expect("watching");
        for _ in 0..QUEUE * 3 {
            hub.frame(&Bytes::from_static(b"f"), false);
        }
        // One start frame, then QUEUE live ones; the rest dropped, not queued.
        assert_eq!(rx.len(), 1 + QUEUE);
        assert_eq!(hub.dropped_frames(), 2 * QUEUE as u64);
        assert_eq!(hub.lock().subs.len(), 1, "lagging, not yet for SLOW_READER");
        // Lagging for longer than SLOW_READER: the subscription goes.
        if let Some(sub) = hub.lock().subs.first_mut() {
            sub.lagging_since = Instant::now().checked_sub(SLOW_READER);
        }
        hub.frame(&Bytes::from_static(b"f"), false);
        assert!(hub.lock().subs.is_empty());
        // The queue is written out, then the response ends as a slow reader's.
        assert_eq!(rx.try_iter().count(), 1 + QUEUE);
        assert!(matches!(
            rx.try_recv(),
            Err(crossbeam_channel::TryRecvError::Disconnected)
        ));
    }
}
