//! The client's `--http ADDR` output: a page listing the streams with a player, and the
//! stream being watched for browsers and players.
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | HTML page: the streams (a button switches), and the player: an `<img>` for MJPEG, the URL to open in ffplay, VLC or mpv for MPEG-TS |
//! | `GET /stream` | the stream watched: MJPEG as `multipart/x-mixed-replace` (one `image/jpeg` part per frame), MPEG-TS as `video/mp2t` |
//! | `GET /stream.mjpeg`, `GET /stream.ts` | the same, only while the stream watched is of that kind (else 409) |
//! | `GET /streams` | JSON: the stream watched and the catalogue |
//! | `POST /switch` (form `stream=NAME`), `GET /switch?stream=NAME` | switch stream, then redirect to `/` |
//!
//! A stream response starts at the latest decodable start the client has (the last JPEG;
//! for TS the units since the last keyframe), then follows live. It ends when the
//! client switches to a stream of the other kind (the page reloads itself), and a
//! TS-to-TS or MJPEG-to-MJPEG switch continues on the same response from the new
//! stream's first keyframe. A slow reader loses frames (counted), never stalls the client.
//!
//! A small server on `std::net` (one thread per connection, at most [`MAX_CONNECTIONS`]),
//! because streaming responses need to own their socket: malformed requests get a 400.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use ott_proto::{MediaKind, StreamInfo};

/// Most simultaneous HTTP connections.
pub const MAX_CONNECTIONS: usize = 32;
/// Frames queued per streaming response before frames are dropped for it.
const QUEUE: usize = 64;
/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Most bytes of the latest decodable start kept for new HTTP viewers.
const MAX_START: usize = 8 << 20;
const BOUNDARY: &str = "ottframe";

enum Msg {
    Frame(Bytes),
    End,
}

struct Sub {
    kind: MediaKind,
    tx: Sender<Msg>,
}

#[derive(Default)]
struct State {
    watching: Option<StreamInfo>,
    catalogue: Vec<StreamInfo>,
    subs: Vec<Sub>,
    /// Frames since the last keyframe of the stream watched.
    start: VecDeque<Bytes>,
    start_bytes: usize,
    dropped: u64,
    bad_requests: u64,
}

/// What the HTTP output serves; the viewer feeds it.
#[derive(Default)]
pub struct Hub {
    state: Mutex<State>,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
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
            .retain(|sub| match sub.tx.try_send(Msg::Frame(data.clone())) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    dropped += 1;
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            });
        s.dropped += dropped;
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
        s.subs.push(Sub { kind: w.kind, tx });
        Ok((w.kind, rx))
    }

    /// Frames dropped for slow HTTP readers, and malformed requests, so far.
    pub fn counters(&self) -> (u64, u64) {
        let s = self.lock();
        (s.dropped, s.bad_requests)
    }
}

fn kind_name(k: MediaKind) -> &'static str {
    match k {
        MediaKind::Mjpeg => "MJPEG",
        MediaKind::Ts => "MPEG-TS",
    }
}

/// Serve the HTTP output on `addr` in background threads; switch requests are sent on
/// `switch`. Returns the bound address.
pub fn serve(
    addr: SocketAddr,
    hub: Arc<Hub>,
    switch: Sender<String>,
) -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("cannot serve --http on {addr}"))?;
    let bound = listener.local_addr()?;
    let active = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    let _ = respond(
                        &conn,
                        "503 Service Unavailable",
                        "text/plain",
                        b"too many connections\n",
                    );
                    continue;
                }
                active.fetch_add(1, Ordering::Relaxed);
                let (hub, switch, active) = (hub.clone(), switch.clone(), active.clone());
                let spawned = thread::Builder::new()
                    .name("http-conn".into())
                    .spawn(move || {
                        if let Err(e) = handle(conn, &hub, &switch, bound) {
                            tracing::debug!(error = %e, "http connection ended");
                        }
                        active.fetch_sub(1, Ordering::Relaxed);
                    });
                if spawned.is_err() {
                    tracing::warn!("cannot start an http connection thread");
                }
            }
        })
        .context("cannot start the http thread")?;
    tracing::info!(%bound, "http output: open http://{bound}/ in a browser");
    Ok(bound)
}

struct Request {
    method: String,
    path: String,
    query: String,
    body: String,
}

fn read_request(conn: &TcpStream) -> Result<Request, String> {
    let mut r = BufReader::new(conn.take(MAX_HEAD as u64 + 4096));
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("bad request line {:?}", line.trim()));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported version {version:?}"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut head = line.len();
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        let n = r.read_line(&mut h).map_err(|e| e.to_string())?;
        head += n;
        if n == 0 || head > MAX_HEAD {
            return Err("request head too long or cut".into());
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                content_length = v
                    .trim()
                    .parse()
                    .map_err(|_| "bad content-length".to_string())?;
            }
        }
    }
    if content_length > 4096 {
        return Err("request body too large".into());
    }
    let mut body = vec![0u8; content_length];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn respond(mut conn: &TcpStream, status: &str, ctype: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    conn.write_all(body)?;
    conn.flush()
}

fn handle(
    conn: TcpStream,
    hub: &Hub,
    switch: &Sender<String>,
    bound: SocketAddr,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let req = match read_request(&conn) {
        Ok(r) => r,
        Err(e) => {
            hub.lock().bad_requests += 1;
            return respond(
                &conn,
                "400 Bad Request",
                "text/plain",
                format!("bad request: {e}\n").as_bytes(),
            );
        }
    };
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/") => respond(
            &conn,
            "200 OK",
            "text/html; charset=utf-8",
            page(hub, bound).as_bytes(),
        ),
        ("GET", "/streams") => {
            let s = hub.lock();
            let v = serde_json::json!({
                "watching": s.watching.as_ref().map(|w| &w.name),
                "kind": s.watching.as_ref().map(|w| kind_name(w.kind)),
                "streams": s.catalogue.iter().map(|c| serde_json::json!({"name": c.name, "kind": kind_name(c.kind)})).collect::<Vec<_>>(),
                "dropped_frames": s.dropped,
                "bad_requests": s.bad_requests,
            });
            drop(s);
            respond(
                &conn,
                "200 OK",
                "application/json",
                v.to_string().as_bytes(),
            )
        }
        ("GET", "/stream") => stream(conn, hub, None),
        ("GET", "/stream.mjpeg") => stream(conn, hub, Some(MediaKind::Mjpeg)),
        ("GET", "/stream.ts") => stream(conn, hub, Some(MediaKind::Ts)),
        ("GET" | "POST", "/switch") => {
            let form = if req.method == "POST" {
                req.body.as_str()
            } else {
                req.query.as_str()
            };
            let name = form
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "stream")
                .map(|(_, v)| url_decode(v))
                .unwrap_or_default();
            let name = name.trim();
            if name.is_empty() {
                return respond(
                    &conn,
                    "400 Bad Request",
                    "text/plain",
                    b"missing stream=NAME\n",
                );
            }
            tracing::info!(stream = %name, "switch requested over http");
            let _ = switch.send(name.to_string());
            let mut c = &conn;
            write!(c, "HTTP/1.1 303 See Other\r\nLocation: /\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
            c.flush()
        }
        ("GET", _) => respond(
            &conn,
            "404 Not Found",
            "text/plain",
            b"not found: try /, /stream, /streams\n",
        ),
        _ => respond(
            &conn,
            "405 Method Not Allowed",
            "text/plain",
            b"method not allowed\n",
        ),
    }
}

fn stream(conn: TcpStream, hub: &Hub, want: Option<MediaKind>) -> std::io::Result<()> {
    let (kind, rx) = match hub.subscribe(want) {
        Ok(x) => x,
        Err(e) => {
            return respond(
                &conn,
                "409 Conflict",
                "text/plain",
                format!("{e}\n").as_bytes(),
            )
        }
    };
    let mut w = std::io::BufWriter::new(&conn);
    let ctype = match kind {
        MediaKind::Mjpeg => format!("multipart/x-mixed-replace; boundary={BOUNDARY}"),
        MediaKind::Ts => "video/mp2t".to_string(),
    };
    write!(w, "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n")?;
    w.flush()?;
    // A long write timeout: a paused player may read slowly; frames queue then drop.
    conn.set_write_timeout(Some(Duration::from_secs(30)))?;
    // Ends at a switch to the other kind (End), or after 30 s without a frame.
    while let Ok(Msg::Frame(f)) = rx.recv_timeout(Duration::from_secs(30)) {
        if kind == MediaKind::Mjpeg {
            write!(
                w,
                "--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
                f.len()
            )?;
            w.write_all(&f)?;
            w.write_all(b"\r\n")?;
        } else {
            w.write_all(&f)?;
        }
        w.flush()?;
    }
    w.flush()?;
    conn.shutdown(std::net::Shutdown::Both)
}

fn url_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(c),
                }
            }
            _ => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(hub: &Hub, bound: SocketAddr) -> String {
    let s = hub.lock();
    let mut list = String::new();
    for c in &s.catalogue {
        let name = html_escape(&c.name);
        let current = s.watching.as_ref().is_some_and(|w| w.name == c.name);
        list.push_str(&format!(
            "<li><form method=\"post\" action=\"/switch\"><input type=\"hidden\" name=\"stream\" value=\"{name}\"><button{}>{name}</button> <small>{}</small>{}</form></li>\n",
            if current { " disabled" } else { "" },
            kind_name(c.kind),
            if current { " &larr; watching" } else { "" },
        ));
    }
    let player = match &s.watching {
        Some(w) if w.kind == MediaKind::Mjpeg => format!(
            "<img id=\"player\" src=\"/stream.mjpeg\" alt=\"{}\">",
            html_escape(&w.name)
        ),
        Some(w) => format!(
            "<p id=\"player\">{} is MPEG-TS, which browsers do not play: open <a href=\"/stream.ts\">http://{bound}/stream.ts</a> with <code>ffplay</code>, <code>mpv</code> or VLC.</p>",
            html_escape(&w.name)
        ),
        None => "<p id=\"player\">Waiting for the stream…</p>".to_string(),
    };
    let title = s
        .watching
        .as_ref()
        .map(|w| html_escape(&w.name))
        .unwrap_or_else(|| "ott".into());
    let kind = s.watching.as_ref().map(|w| kind_name(w.kind)).unwrap_or("");
    format!(
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
"#,
        shown = serde_json::to_string(&s.watching.as_ref().map(|w| &w.name))
            .unwrap_or_else(|_| "null".into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_url_decode() {
        assert_eq!(url_decode("a+b%20c%2Fd%zz"), "a b c/d%zz");
        assert_eq!(url_decode("%"), "%");
    }

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
}
