//! A PoP serves browsers and players directly (`ott-node --http`), with the real
//! programs on loopback (nets 127.71–127.75): H.264 plays in headless Chromium's
//! `<video>` over HLS, MJPEG in an `<img>`, ffprobe reads the HLS and TS URLs, and the
//! PoP leaves a stream after its last HTTP viewer.
//!
//! The checks that need ffprobe or Chromium print `SKIPPED: …` and pass when the tool is
//! missing, unless the `CI` environment variable is set: in CI they must run.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin_dir, launch, work_dir, ONE_AT_A_TIME};
use ott_testkit::{http_get, wait_for, Cluster};

/// A child process killed (by its pid) when dropped, also when a test fails.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `tool` runs; when it does not, say so, and fail if `CI` is set.
fn have(tool: &str) -> bool {
    let flag = if tool == "chromium" {
        "--version"
    } else {
        "-version"
    };
    let ok = Command::new(tool)
        .arg(flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is required in CI (CI is set; .ci/run installs it) but could not be run"
        );
        eprintln!("SKIPPED: {tool} is not installed, so this check does not run here");
    }
    ok
}

/// A line topology whose PoP runs with `--http`: the cluster, the PoP's id, its HTTP
/// address, and the PoP process.
struct Edge {
    c: Cluster,
    pop: String,
    http: SocketAddr,
    _node: Guard,
}

fn edge(name: &str, net: u8) -> Edge {
    edge_with(launch(name, "line.toml", net), name)
}

/// [`edge`] on a cluster already started.
fn edge_with(mut c: Cluster, name: &str) -> Edge {
    let pop = c
        .topology
        .pops()
        .first()
        .map(|n| n.id.clone())
        .expect("line.toml has a PoP");
    // The launcher starts every node without --http: start the PoP again with it.
    c.kill_node(&pop).expect("stop the PoP");
    let status = c.status_addr(&pop).expect("PoP status address");
    let http = SocketAddr::new(status.ip(), 8080);
    let log = work_dir(&format!("{name}-edge")).with_extension("log");
    let mut node = Command::new(bin_dir().join("ott-node"));
    c.add_key_flag(&mut node);
    let node = node
        .args(["--id", &pop, "--bootstrap", &c.bootstrap.to_string()])
        .args(["--status", &status.to_string(), "--http", &http.to_string()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("edge log"))
        .spawn()
        .expect("ott-node starts");
    let node = Guard(node);
    c.wait_converged(Duration::from_secs(30))
        .expect("the PoP is back in the tree");
    wait_for(
        Duration::from_secs(20),
        "the edge lists the streams",
        || {
            http_get(http, "/streams")
                .map(|b| b.contains("\"testcard\"") && b.contains("\"countdown\""))
                .unwrap_or(false)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {}", std::fs::read_to_string(&log).unwrap_or_default()));
    Edge {
        c,
        pop,
        http,
        _node: node,
    }
}

/// The PoP's children for `stream` in its `/status` (empty when it is not joined).
fn children(c: &Cluster, pop: &str, stream: &str) -> Vec<String> {
    // A status request can time out on a loaded machine: that is no answer, not "no
    // children" (which would end a wait for the PoP to leave at once). Ask again.
    let mut status = None;
    let asked = wait_for(Duration::from_secs(15), "the PoP's status", || {
        status = c.status(pop).ok();
        status.is_some()
    });
    let (Ok(()), Some(s)) = (asked, status) else {
        panic!("{pop} gave no status within 15 s")
    };
    s["streams"][stream]["children"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Status line and body of a GET (HTTP/1.1, connection closed by the server).
fn get(addr: SocketAddr, path: &str) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send");
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(all.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, all[split..].to_vec())
}

fn ffprobe(url: &str) -> (String, String) {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-rw_timeout", "15000000"])
        .args(["-count_packets", "-read_intervals", "%+3"])
        .args([
            "-show_entries",
            "stream=codec_name,width,height,nb_read_packets",
            "-of",
            "csv=p=0",
            url,
        ])
        .output()
        .expect("ffprobe runs");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ffprobe_reads_hls_and_ts_and_the_pop_leaves_after_its_last_viewer() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let e = edge("browser-players", 71);
    // Nothing is joined before a viewer comes.
    assert!(children(&e.c, &e.pop, "testcard").is_empty());
    let page = http_get(e.http, "/").expect("index");
    assert!(
        page.contains("href=\"/watch/testcard\"") && page.contains("H.264"),
        "{page}"
    );
    let (status, body) = get(e.http, "/hls/testcard/index.m3u8");
    let playlist = String::from_utf8_lossy(&body);
    assert_eq!(status, "HTTP/1.1 200 OK", "{playlist}");
    assert!(
        playlist.starts_with("#EXTM3U\n") && playlist.contains("#EXTINF:"),
        "{playlist}"
    );
    // The PoP joined for its HTTP viewer: one client child, its own edge.
    let joined = children(&e.c, &e.pop, "testcard");
    assert_eq!(joined.len(), 1, "{joined:?}");
    assert!(joined[0].starts_with("client@"), "{joined:?}");
    // Every segment listed is whole TS, starting with a PAT.
    let seg = playlist
        .lines()
        .find(|l| l.ends_with(".ts") && !l.starts_with('#'))
        .expect("a segment");
    let (status, ts) = get(e.http, &format!("/hls/testcard/{seg}"));
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(!ts.is_empty() && ts.len() % 188 == 0, "{} bytes", ts.len());
    assert_eq!(&ts[..4], &[0x47, 0x40, 0x00, ts[3]], "a PAT first");
    let (status, _) = get(e.http, "/hls/countdown/index.m3u8");
    assert_eq!(status, "HTTP/1.1 409 Conflict", "HLS is for TS streams");
    let (status, _) = get(e.http, "/hls/nope/index.m3u8");
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    if have("ffprobe") {
        for url in ["/hls/testcard/index.m3u8", "/ts/testcard"] {
            let (out, err) = ffprobe(&format!("http://{}{url}", e.http));
            let line = out.lines().next().unwrap_or_default();
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(
                fields.get(..3),
                Some(&["h264", "320", "240"][..]),
                "ffprobe {url}: {out} {err}"
            );
            let packets: u64 = fields.get(3).and_then(|n| n.parse().ok()).unwrap_or(0);
            assert!(
                packets >= 25,
                "ffprobe read {packets} packets of {url}: {err}"
            );
        }
    }

    // A raw TS reader keeps the stream; when it goes, and no HLS request comes, the
    // PoP leaves the stream.
    let mut reader = TcpStream::connect_timeout(&e.http, Duration::from_secs(5)).expect("connect");
    write!(reader, "GET /ts/testcard HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    reader
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = vec![0u8; 64 * 1024];
    let t0 = Instant::now();
    let mut got = 0;
    // Longer than the edge's linger: the open response alone keeps the stream.
    while t0.elapsed() < ott_apps::edge::LINGER + Duration::from_secs(2) {
        got += reader.read(&mut buf).expect("TS keeps coming");
    }
    assert!(got > 100_000, "{got} bytes in {:?}", t0.elapsed());
    assert_eq!(children(&e.c, &e.pop, "testcard").len(), 1);
    drop(reader);
    let left = Instant::now();
    wait_for(
        ott_apps::edge::LINGER + Duration::from_secs(15),
        "the PoP has no subscriber to testcard",
        || children(&e.c, &e.pop, "testcard").is_empty(),
    )
    .expect("the PoP leaves the stream");
    let after = left.elapsed();
    eprintln!(
        "the PoP left testcard {:.1} s after its last HTTP viewer",
        after.as_secs_f64()
    );
    assert!(after >= ott_apps::edge::LINGER - Duration::from_secs(1));
    let s = e.c.status(&e.pop).expect("status");
    assert_eq!(s["http"]["joined"], serde_json::json!([]), "{s}");
}

#[test]
fn http_on_a_relay_is_refused_with_a_clear_error() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = launch("browser-relay", "line.toml", 72);
    let relay = c
        .topology
        .nodes
        .iter()
        .find(|n| n.role == ott_overlay::Role::Relay)
        .map(|n| n.id.clone())
        .expect("a relay");
    c.kill_node(&relay).expect("stop the relay");
    let mut node = Command::new(bin_dir().join("ott-node"));
    c.add_key_flag(&mut node);
    let out = node
        .args(["--id", &relay, "--bootstrap", &c.bootstrap.to_string()])
        .args(["--http", "127.72.255.30:8080", "--bootstrap-wait", "10"])
        .output()
        .expect("ott-node runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--http serves viewers, which only a PoP has") && err.contains("relay"),
        "{err}"
    );
}

/// A minimal WebSocket client for the DevTools protocol: text frames only.
struct Ws {
    s: TcpStream,
    next_id: u64,
    /// Events (messages without an id) received while waiting for answers.
    events: Vec<serde_json::Value>,
}

impl Ws {
    fn connect(url: &str) -> Ws {
        let rest = url.strip_prefix("ws://").expect("a ws:// url");
        let (host, path) = rest.split_once('/').expect("a path");
        let mut s = TcpStream::connect(host).expect("connect to devtools");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        write!(
            s,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .expect("handshake");
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).expect("handshake answer");
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"));
        Ws {
            s,
            next_id: 1,
            events: Vec::new(),
        }
    }

    fn send(&mut self, text: &str) {
        let p = text.as_bytes();
        let mut f = vec![0x81u8];
        match p.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        f.extend_from_slice(&mask);
        f.extend(p.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&f).expect("ws send");
    }

    fn recv(&mut self) -> String {
        let mut msg = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.s.read_exact(&mut h).expect("ws frame");
            let len = match h[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.s.read_exact(&mut b).expect("len");
                    u64::from(u16::from_be_bytes(b))
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.s.read_exact(&mut b).expect("len");
                    u64::from_be_bytes(b)
                }
                n => u64::from(n),
            };
            let mut p = vec![0u8; len as usize];
            self.s.read_exact(&mut p).expect("ws payload");
            if matches!(h[0] & 0x0f, 0 | 1) {
                msg.extend_from_slice(&p);
                if h[0] & 0x80 != 0 {
                    return String::from_utf8_lossy(&msg).into_owned();
                }
            }
        }
    }

    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&serde_json::json!({"id": id, "method": method, "params": params}).to_string());
        loop {
            let v: serde_json::Value = serde_json::from_str(&self.recv()).expect("devtools json");
            if v["id"].as_u64() == Some(id) {
                return v["result"].clone();
            }
            if v["id"].is_null() {
                self.events.push(v);
            }
        }
    }

    fn eval(&mut self, expr: &str) -> serde_json::Value {
        self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expr, "returnByValue": true}),
        )["result"]["value"]
            .clone()
    }
}

/// GET over HTTP/1.1 with Content-Length (Chromium's DevTools endpoint).
fn get11(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut r = BufReader::new(s);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    String::from_utf8(body).ok()
}

/// Headless Chromium showing `url`, and a DevTools session on its page.
struct Browser {
    ws: Ws,
    _chrome: Guard,
}

fn chromium(profile: &Path, url: &str) -> Browser {
    let mut chrome = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
            "--window-size=800,600",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let stderr = chrome.stderr.take().expect("piped stderr");
    let chrome = Guard(chrome);
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.split("DevTools listening on ").nth(1) {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let browser_ws = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("chromium prints its DevTools address");
    let devtools: SocketAddr = browser_ws
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("devtools address");
    let mut page_ws = None;
    wait_for(Duration::from_secs(20), "chromium has a page", || {
        let list: serde_json::Value = get11(devtools, "/json/list")
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or_default();
        page_ws = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from));
        page_ws.is_some()
    })
    .expect("page target");
    Browser {
        ws: Ws::connect(&page_ws.expect("checked above")),
        _chrome: chrome,
    }
}

/// The `<video>`'s position and decoded frames, and the page's own figures.
fn video_state(ws: &mut Ws) -> serde_json::Value {
    ws.eval(
        "(() => { const v = document.querySelector('video#player'); if (!v) return null; \
         const q = v.getVideoPlaybackQuality(); \
         const r = x => [...Array(x.length).keys()].map(i => x.start(i).toFixed(2) + '-' + x.end(i).toFixed(2)).join(','); \
         return {t: v.currentTime, buffered: r(v.buffered), seekable: r(v.seekable), frames: q.totalVideoFrames, dropped: q.droppedVideoFrames, \
         state: v.readyState, paused: v.paused, error: v.error ? String(v.error.message || v.error.code) : null, \
         first: window.ott ? window.ott.firstPictureMs : null, latency: window.ott ? window.ott.latencyS : null, \
         w: v.videoWidth}; })()",
    )
}

#[test]
fn h264_plays_in_chromium_from_the_pop_and_mjpeg_is_one_click_away() {
    if !have("chromium") {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let e = edge("browser-chromium", 73);
    let profile = work_dir("browser-chromium-profile");
    std::fs::create_dir_all(&profile).expect("profile dir");
    let mut b = chromium(&profile, &format!("http://{}/watch/testcard", e.http));
    let ws = &mut b.ws;
    // The video plays: its position and its decoded frames grow.
    let mut first = serde_json::Value::Null;
    wait_for(Duration::from_secs(30), "the <video> shows frames", || {
        first = video_state(ws);
        first["frames"].as_u64().unwrap_or(0) > 10 && first["t"].as_f64().unwrap_or(0.0) > 0.3
    })
    .unwrap_or_else(|err| panic!("{err}: {first}"));
    assert_eq!(first["w"].as_u64(), Some(320), "{first}");
    let t0 = Instant::now();
    let mut later = serde_json::Value::Null;
    wait_for(Duration::from_secs(20), "the <video> advances", || {
        later = video_state(ws);
        later["t"].as_f64().unwrap_or(0.0) > first["t"].as_f64().unwrap_or(0.0) + 3.0
            && later["frames"].as_u64().unwrap_or(0) > first["frames"].as_u64().unwrap_or(0) + 50
    })
    .unwrap_or_else(|err| panic!("{err}: from {first} to {later}"));
    let played = later["t"].as_f64().unwrap_or(0.0) - first["t"].as_f64().unwrap_or(0.0);
    let wall = t0.elapsed().as_secs_f64();
    eprintln!(
        "chromium: {played:.2} s of video in {wall:.2} s; first picture {} ms after opening the page; latency {} s; {later}",
        later["first"], later["latency"]
    );
    assert!(later["error"].is_null(), "{later}");
    // The facts under the picture are filled in, in a readable colour.
    let facts = ws.eval("[...document.querySelectorAll('dl.facts dd')].map(d => d.textContent)");
    let texts: Vec<&str> = facts
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(texts.len(), 5, "{facts}");
    assert!(texts[0].contains(&e.pop), "{facts}");
    assert!(
        texts[1].parse::<f64>().is_ok() || texts[1].contains("frames"),
        "{facts}"
    );
    assert!(texts[3].contains(" s behind"), "{facts}");
    let contrast = ws.eval(
        "(() => { const lum = c => { const [r, g, b] = c.match(/\\d+/g).map(Number).map(v => v / 255).map(v => v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4)); return 0.2126 * r + 0.7152 * g + 0.0722 * b; }; \
         const bg = lum(getComputedStyle(document.body).backgroundColor); \
         return [...document.querySelectorAll('dd, p, li, h1')].map(e => { const f = lum(getComputedStyle(e).color); return (Math.max(f, bg) + 0.05) / (Math.min(f, bg) + 0.05); }).reduce((a, b) => Math.min(a, b), 99); })()",
    );
    let contrast = contrast.as_f64().unwrap_or(0.0);
    assert!(
        contrast >= 4.5,
        "text contrast {contrast:.1} (WCAG AA wants 4.5)"
    );
    // The MJPEG stream is one click away.
    let clicked = ws.eval(
        "(() => { const a = [...document.querySelectorAll('ul.streams a')].find(a => a.textContent === 'countdown'); if (!a) return false; a.click(); return true; })()",
    );
    assert_eq!(clicked.as_bool(), Some(true), "a link to countdown");
    let mut width = serde_json::Value::Null;
    wait_for(Duration::from_secs(20), "the MJPEG <img> shows frames", || {
        width = ws.eval("(() => { const i = document.querySelector('img#player'); return i ? i.naturalWidth : -1; })()");
        width.as_i64() == Some(320)
    })
    .unwrap_or_else(|err| panic!("{err}: {width}"));
    assert_eq!(ws.eval("document.title").as_str(), Some("ott: countdown"));
}

/// Not a check: watch `OTT_EDGE_URL` (a running edge's /watch/NAME) in Chromium and
/// print the video's state every half second for `OTT_WATCH_SECS` seconds.
#[test]
#[ignore]
fn watch_a_running_edge() {
    let Ok(url) = std::env::var("OTT_EDGE_URL") else {
        return;
    };
    let secs: u64 = std::env::var("OTT_WATCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let profile = work_dir("browser-watch-profile");
    std::fs::create_dir_all(&profile).expect("profile dir");
    let mut b = chromium(&profile, &url);
    b.ws.call("Media.enable", serde_json::json!({}));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(500));
        let v = video_state(&mut b.ws);
        eprintln!("{:5.1} {v}", t0.elapsed().as_secs_f64());
        for e in b.ws.events.drain(..) {
            if e["method"]
                .as_str()
                .is_some_and(|m| m.starts_with("Media."))
            {
                eprintln!("      media: {}", e["params"]);
            }
        }
    }
}

/// Not a check, a measurement (docs/browsers.md): `cargo test -p ott-apps --test browser
/// measure -- --ignored --nocapture`. For `OTT_RUNS` runs each (default 5): a browser
/// opens /watch/testcard when the PoP has not joined the stream ("cold"), and when
/// another HLS viewer keeps it joined ("warm"); prints the time to the first picture,
/// the latency the page computes (mean over seconds 8 to 12), and frames shown.
#[test]
#[ignore]
fn measure_first_picture_and_latency() {
    if !have("chromium") {
        return;
    }
    let runs: usize = std::env::var("OTT_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // OTT_GOP=N: the testcard re-encoded with a keyframe every N frames (needs ffmpeg).
    let e = match std::env::var("OTT_GOP")
        .ok()
        .and_then(|g| g.parse::<u32>().ok())
    {
        Some(gop) => {
            let videos = work_dir("browser-measure-videos");
            std::fs::create_dir_all(&videos).expect("videos dir");
            let ok = Command::new("ffmpeg")
                .args(["-v", "error", "-y", "-i"])
                .arg(common::root().join("videos/testcard.ts"))
                .args(["-c:v", "libx264", "-g", &gop.to_string(), "-bf", "0"])
                .arg(videos.join("testcard.ts"))
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ffmpeg re-encodes the testcard");
            for f in ["countdown.mjpeg", "countdown.fps"] {
                std::fs::copy(common::root().join("videos").join(f), videos.join(f))
                    .expect("copy clip");
            }
            eprintln!("measure: testcard with a keyframe every {gop} frames");
            let c = Cluster::start(ott_testkit::LaunchOptions {
                bin_dir: bin_dir(),
                topology: common::root().join("topologies/line.toml"),
                videos,
                net: 74,
                work_dir: work_dir("browser-measure"),
                log_filter: "info".into(),
            })
            .expect("cluster starts");
            c.wait_converged(Duration::from_secs(30))
                .expect("tree forms");
            edge_with(c, "browser-measure")
        }
        None => edge("browser-measure", 74),
    };
    let profile = work_dir("browser-measure-profile");
    for warm in [false, true] {
        for run in 0..runs {
            wait_for(Duration::from_secs(40), "the PoP left testcard", || {
                warm || children(&e.c, &e.pop, "testcard").is_empty()
            })
            .expect("left");
            // A warm start: another player has been polling the playlist for a while.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let poller = warm.then(|| {
                let (stop, http) = (stop.clone(), e.http);
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = get(http, "/hls/testcard/index.m3u8?s=other");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                })
            });
            if warm {
                std::thread::sleep(Duration::from_secs(8));
            }
            let _ = std::fs::remove_dir_all(&profile);
            std::fs::create_dir_all(&profile).expect("profile dir");
            let mut b = chromium(&profile, &format!("http://{}/watch/testcard", e.http));
            let t0 = Instant::now();
            let mut lat = Vec::new();
            let mut last = serde_json::Value::Null;
            while t0.elapsed() < Duration::from_secs(12) {
                std::thread::sleep(Duration::from_millis(250));
                last = video_state(&mut b.ws);
                if t0.elapsed() >= Duration::from_secs(8) {
                    lat.extend(last["latency"].as_f64());
                }
            }
            let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
            eprintln!(
                "measure {} run {run}: first picture {} ms, latency {mean:.2} s, {} frames shown in 12 s, error {}",
                if warm { "warm" } else { "cold" },
                last["first"],
                last["frames"],
                last["error"]
            );
            drop(b);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(p) = poller {
                let _ = p.join();
            }
        }
    }
}
