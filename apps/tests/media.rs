//! Media tests with the real programs on loopback (nets 127.50–127.59): MPEG-TS end to
//! end, live input, instant start, the HTTP output in headless Chromium, and clean
//! switching between a TS and an MJPEG stream.
//!
//! The checks that need ffmpeg/ffprobe or Chromium print `SKIPPED: …` and pass when the
//! tool is missing, unless the `CI` environment variable is set: in CI they must run.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin_dir, root, ONE_AT_A_TIME};
use ott_media::{mjpeg, ts};
use ott_testkit::{http_get, parse_summary, verify_mjpeg, wait_for, Cluster, LaunchOptions};

/// Keyframe interval of videos/testcard.ts: `-g 50` at 25 fps.
const TESTCARD_GOP: Duration = Duration::from_secs(2);

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// Whether `tool` runs; when it does not, say so, and fail if `CI` is set.
fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg(if tool == "chromium" {
            "--version"
        } else {
            "-version"
        })
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

fn launch(name: &str, topology: &str, net: u8, server_args: Vec<String>) -> Cluster {
    let c = Cluster::start_with_server_args(
        LaunchOptions {
            bin_dir: bin_dir(),
            topology: root().join("topologies").join(topology),
            videos: root().join("videos"),
            net,
            work_dir: scratch(name),
            log_filter: "info".into(),
        },
        server_args,
    )
    .expect("cluster starts");
    c.wait_converged(Duration::from_secs(30))
        .expect("tree forms");
    c
}

/// A child process killed (by its pid) when dropped, also when a test fails.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// ffmpeg's complaints when decoding `path` (empty: it decodes cleanly).
fn decode_errors(path: &Path) -> String {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg runs");
    let mut e = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() && e.is_empty() {
        e = format!("ffmpeg failed: {}", out.status);
    }
    e
}

/// Video frames ffprobe decodes in `input` (a file or a URL).
fn probe_frames(input: &str) -> usize {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args([
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "csv=p=0",
            input,
        ])
        .output()
        .expect("ffprobe runs");
    // ffprobe prints the stream once per program and once alone: take the first.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

fn summary_ms(s: &std::collections::HashMap<String, String>, key: &str) -> Option<u64> {
    s.get(key).and_then(|v| v.parse().ok())
}

#[test]
fn ts_end_to_end_through_the_seed_topology_decodes_at_the_clip_rate() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = launch("media-ts-e2e", "seed.toml", 50, Vec::new());
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("media-ts-e2e.ts");
    let _ = std::fs::remove_file(&out);
    let out_s = out.display().to_string();
    let secs = 8.0;
    c.spawn_client(
        "v",
        None,
        &[
            "--stream",
            "testcard",
            "--duration",
            "8",
            "--output",
            &out_s,
        ],
    )
    .expect("client starts");
    let summary = c
        .wait_client("v", Duration::from_secs(40))
        .expect("client ends cleanly");
    let s = parse_summary(&summary);
    let data = std::fs::read(&out).expect("output written");
    assert!(!data.is_empty(), "nothing received: {summary}");
    assert_eq!(data.len() % ts::PACKET_LEN, 0, "whole TS packets only");
    assert_eq!(
        ts::Packet::new(&data[..ts::PACKET_LEN]).map(|p| p.pid()),
        Some(ts::PAT_PID),
        "the file starts with a PAT (a decodable start)"
    );
    if !(have("ffmpeg") && have("ffprobe")) {
        return;
    }
    let errors = decode_errors(&out);
    assert!(errors.is_empty(), "ffmpeg reports errors: {errors}");
    let frames = probe_frames(&out_s);
    let units: usize = s.get("frames").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert_eq!(
        frames, units,
        "every unit written is one decoded frame: {summary}"
    );
    let first = summary_ms(&s, "first_frame_ms").expect("a first frame") as f64 / 1000.0;
    // 25 fps for the time streamed, plus the GOP the PoP replayed at the start (instant
    // start: at most one keyframe interval of frames, sent at once).
    let live = 25.0 * (secs - first);
    let gop = 25.0 * TESTCARD_GOP.as_secs_f64();
    eprintln!("ts e2e: {frames} frames decoded for {live:.0} frames of time (+ up to {gop:.0} replayed); first frame after {first:.3} s");
    assert!(
        frames as f64 >= 0.9 * live && frames as f64 <= live + gop + 3.0,
        "{frames} frames for {:.2} s of streaming at 25 fps: {summary}",
        secs - first
    );
}

#[test]
fn live_udp_input_fed_by_ffmpeg_reaches_a_client_and_decodes() {
    if !(have("ffmpeg") && have("ffprobe")) {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let feed_addr: SocketAddr = "127.51.255.1:5000".parse().expect("address");
    let mut c = launch(
        "media-live",
        "seed.toml",
        51,
        vec!["--live".into(), format!("cam=udp://{feed_addr}")],
    );
    let feed = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25",
        ])
        .args([
            "-c:v", "libx264", "-preset", "veryfast", "-g", "25", "-pix_fmt", "yuv420p",
        ])
        .args(["-f", "mpegts"])
        .arg(format!("udp://{feed_addr}?pkt_size=1316"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ffmpeg starts");
    let _feed = Guard(feed);
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("media-live.ts");
    let _ = std::fs::remove_file(&out);
    let out_s = out.display().to_string();
    c.spawn_client(
        "v",
        None,
        &["--stream", "cam", "--duration", "6", "--output", &out_s],
    )
    .expect("client starts");
    let summary = c
        .wait_client("v", Duration::from_secs(40))
        .expect("client ends cleanly");
    let errors = decode_errors(&out);
    assert!(errors.is_empty(), "ffmpeg reports errors: {errors}");
    let frames = probe_frames(&out_s);
    eprintln!("live: {frames} frames decoded; {summary}");
    // Six seconds at 25 fps, less the start: at least half of it.
    assert!(
        frames >= 60,
        "only {frames} frames of the live feed decoded: {summary}"
    );
}

#[test]
fn instant_start_a_second_viewer_starts_faster_than_one_keyframe_interval() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = launch("media-instant", "line.toml", 52, Vec::new());
    let pops: Vec<String> = c.topology.pops().iter().map(|n| n.id.clone()).collect();
    let pop = pops.first().expect("line.toml has a PoP").clone();
    c.spawn_client("first", None, &["--stream", "testcard", "--duration", "40"])
        .expect("client starts");
    wait_for(
        Duration::from_secs(20),
        "the stream flows at the PoP",
        || {
            c.status(&pop)
                .map(|s| {
                    s["streams"]["testcard"]["traffic"]["packets_out"]
                        .as_u64()
                        .unwrap_or(0)
                        > 200
                })
                .unwrap_or(false)
        },
    )
    .expect("stream flows");
    let mut with = Vec::new();
    let mut without = Vec::new();
    for i in 0..4 {
        let name = format!("second{i}");
        c.spawn_client(&name, None, &["--stream", "testcard", "--duration", "2.5"])
            .expect("client starts");
        let summary = c
            .wait_client(&name, Duration::from_secs(30))
            .expect("client ends cleanly");
        let s = parse_summary(&summary);
        let first = summary_ms(&s, "first_frame_ms").expect("a first frame");
        assert!(
            Duration::from_millis(first) < TESTCARD_GOP,
            "viewer {i} waited {first} ms for its first decodable frame: {summary}"
        );
        with.push(first);
        if let Some(live) = summary_ms(&s, "first_live_key_ms") {
            without.push(live);
        }
    }
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    eprintln!(
        "time to first frame: with the PoP's cache {with:?} ms (mean {:.0}); first live keyframe (no cache) {without:?} ms (mean {:.0})",
        mean(&with),
        mean(&without)
    );
}

/// A minimal WebSocket client for the DevTools protocol: text frames only.
struct Ws {
    s: TcpStream,
    next_id: u64,
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
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        Ws { s, next_id: 1 }
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
            let fin = h[0] & 0x80 != 0;
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
                if fin {
                    return String::from_utf8_lossy(&msg).into_owned();
                }
            }
        }
    }

    /// Call a DevTools method and return its result.
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&serde_json::json!({"id": id, "method": method, "params": params}).to_string());
        loop {
            let v: serde_json::Value = serde_json::from_str(&self.recv()).expect("devtools json");
            if v["id"].as_u64() == Some(id) {
                return v["result"].clone();
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

/// GET over HTTP/1.1 (Chromium's DevTools endpoint answers nothing to HTTP/1.0): the body.
fn get11(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    // The body is Content-Length bytes: the connection may stay open after it.
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

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Distinct colours in a rectangle of a PNG (decoded by ffmpeg to raw RGB).
fn colours_in(png: &Path, x: u32, y: u32, w: u32, h: u32) -> usize {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(png)
        .args([
            "-vf",
            &format!("crop={w}:{h}:{x}:{y}"),
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-",
        ])
        .output()
        .expect("ffmpeg runs");
    let set: std::collections::HashSet<&[u8]> = out.stdout.chunks_exact(3).collect();
    set.len()
}

#[test]
fn http_output_plays_in_headless_chromium_and_ffprobe_reads_the_ts_url() {
    if !(have("chromium") && have("ffmpeg") && have("ffprobe")) {
        return;
    }
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = launch("media-http", "line.toml", 53, Vec::new());
    let http: SocketAddr = "127.53.255.10:8000".parse().expect("address");
    let http_s = http.to_string();
    c.spawn_client(
        "web",
        None,
        &[
            "--stream",
            "countdown",
            "--duration",
            "60",
            "--http",
            &http_s,
        ],
    )
    .expect("client starts");
    wait_for(
        Duration::from_secs(20),
        "the page lists the streams",
        || {
            http_get(http, "/streams")
                .map(|b| b.contains("testcard") && b.contains("\"watching\":\"countdown\""))
                .unwrap_or(false)
        },
    )
    .expect("http output up");
    let profile = scratch("media-http-chromium");
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
        .arg(format!("http://{http}/watch/countdown"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let stderr = chrome.stderr.take().expect("piped stderr");
    let _chrome = Guard(chrome);
    // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
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
    wait_for(
        Duration::from_secs(20),
        "chromium has a page target",
        || {
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
        },
    )
    .expect("page target");
    let mut ws = Ws::connect(&page_ws.expect("checked above"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let width = loop {
        let w = ws.eval("(() => { const i = document.querySelector('img#player'); return i ? i.naturalWidth : -1; })()");
        let w = w.as_i64().unwrap_or(-1);
        if w > 0 || Instant::now() > deadline {
            break w;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(width, 320, "the MJPEG <img> shows 320-pixel-wide frames");
    let title = ws.eval("document.title");
    assert_eq!(title.as_str(), Some("ott: countdown"));
    let rect = ws.eval("(() => { const r = document.querySelector('img#player').getBoundingClientRect(); return [r.x, r.y, r.width, r.height].map(Math.round); })()");
    let r: Vec<u32> = rect
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(r.len(), 4, "image rectangle: {rect}");
    let shot = ws.call(
        "Page.captureScreenshot",
        serde_json::json!({"format": "png"}),
    );
    let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
    let shot_path = profile.join("screenshot.png");
    std::fs::write(&shot_path, &png).expect("write screenshot");
    let colours = colours_in(
        &shot_path,
        r[0],
        r[1],
        r[2].min(800 - r[0]),
        r[3].min(600 - r[1]),
    );
    eprintln!(
        "screenshot {} ({} bytes): {colours} colours in the image area",
        shot_path.display(),
        png.len()
    );
    assert!(
        colours > 50,
        "the screenshot's image area is blank ({colours} colours)"
    );

    // Another site's form cannot switch the client, nor can a GET.
    let mut s = TcpStream::connect(http).expect("connect");
    write!(s, "POST /switch HTTP/1.1\r\nHost: {http}\r\nOrigin: http://evil.example\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 15\r\n\r\nstream=testcard").expect("post");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let mut s = TcpStream::connect(http).expect("connect");
    write!(
        s,
        "GET /switch?stream=testcard HTTP/1.1\r\nHost: {http}\r\n\r\n"
    )
    .expect("get");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(http_get(http, "/streams")
        .expect("streams")
        .contains("\"watching\":\"countdown\""));

    // Switch to the TS stream with the page's own button (the browser posts the form
    // with its Origin), and read it as a player would.
    let clicked = ws.eval("(() => { const i = document.querySelector('input[name=stream][value=testcard]'); if (!i) return false; i.form.querySelector('button').click(); return true; })()");
    assert_eq!(
        clicked.as_bool(),
        Some(true),
        "the page has a testcard button"
    );
    wait_for(
        Duration::from_secs(10),
        "the client watches testcard",
        || {
            http_get(http, "/streams")
                .map(|b| b.contains("\"watching\":\"testcard\""))
                .unwrap_or(false)
        },
    )
    .expect("switched");
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-read_intervals",
            "%+3",
            "-show_entries",
            "stream=codec_name,width",
            "-of",
            "csv=p=0",
        ])
        .arg(format!("http://{http}/stream.ts"))
        .output()
        .expect("ffprobe runs");
    let text = String::from_utf8_lossy(&probe.stdout);
    assert!(
        text.contains("h264,320"),
        "ffprobe on the TS URL: {text} {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    // Its page now plays it in a <video> over HLS instead of an <img>.
    let page = http_get(http, "/watch/testcard").expect("page");
    assert!(
        page.contains("<video")
            && page.contains("/hls/testcard/index.m3u8")
            && !page.contains("<img"),
        "{page}"
    );
}

/// Cut a received file into runs of whole TS packets and runs of whole JPEG frames.
fn segments(data: &[u8]) -> Vec<(&'static str, std::ops::Range<usize>)> {
    let mut out: Vec<(&'static str, std::ops::Range<usize>)> = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let (kind, len) = if data[pos] == ts::SYNC_BYTE && pos + ts::PACKET_LEN <= data.len() {
            ("ts", ts::PACKET_LEN)
        } else {
            match mjpeg::first_frame_len(&data[pos..]) {
                Ok(n) => ("mjpeg", n),
                Err(e) => panic!("byte {pos} starts neither a TS packet nor a JPEG frame: {e}"),
            }
        };
        match out.last_mut() {
            Some((k, r)) if *k == kind => r.end = pos + len,
            _ => out.push((kind, pos..pos + len)),
        }
        pos += len;
    }
    out
}

#[test]
fn switching_between_ts_and_mjpeg_never_mixes_bytes() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clips = ott_media::load_dir(&root().join("videos")).expect("clips");
    let countdown = clips
        .iter()
        .find(|c| c.name == "countdown")
        .expect("countdown clip");
    let mut c = launch("media-switch", "seed.toml", 54, Vec::new());
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("media-switch.out");
    let _ = std::fs::remove_file(&out);
    let out_s = out.display().to_string();
    c.spawn_client(
        "v",
        None,
        &[
            "--stream",
            "testcard",
            "--duration",
            "12",
            "--output",
            &out_s,
        ],
    )
    .expect("client starts");
    let size = || std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    wait_for(Duration::from_secs(20), "TS arrives", || size() > 100_000).expect("ts flows");
    c.client_say("v", "countdown").expect("switch");
    let at = size();
    wait_for(Duration::from_secs(10), "MJPEG arrives", || {
        size() > at + 100_000
    })
    .expect("mjpeg flows");
    c.client_say("v", "testcard").expect("switch back");
    let summary = c
        .wait_client("v", Duration::from_secs(40))
        .expect("client ends cleanly");
    let data = std::fs::read(&out).expect("output");
    let segs = segments(&data);
    let kinds: Vec<&str> = segs.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        kinds,
        ["ts", "mjpeg", "ts"],
        "one run per stream, nothing interleaved: {summary}"
    );
    let v = verify_mjpeg(&data[segs[1].1.clone()], countdown).expect("whole JPEG frames");
    assert_eq!(v.intact, v.frames, "every JPEG is a countdown frame");
    assert!(v.in_order);
    let have_ffmpeg = have("ffmpeg");
    for (i, (_, r)) in segs.iter().enumerate().filter(|(_, (k, _))| *k == "ts") {
        let part = &data[r.clone()];
        assert_eq!(
            ts::Packet::new(&part[..ts::PACKET_LEN]).map(|p| p.pid()),
            Some(ts::PAT_PID),
            "TS run {i} starts at a decodable start (PAT)"
        );
        if have_ffmpeg {
            let p = out.with_extension(format!("part{i}.ts"));
            std::fs::write(&p, part).expect("write part");
            let errors = decode_errors(&p);
            assert!(errors.is_empty(), "TS run {i}: {errors}");
        }
    }
}

#[test]
fn play_without_ffplay_says_what_to_do() {
    let empty = scratch("media-no-ffplay");
    let out = Command::new(Path::new(env!("CARGO_BIN_EXE_ott-client")))
        .args([
            "--bootstrap",
            "127.59.255.254:7070",
            "--stream",
            "x",
            "--play",
            "--bootstrap-wait",
            "1",
        ])
        .env("PATH", &empty)
        .output()
        .expect("client runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--play needs ffplay") && err.contains("apt-get install ffmpeg"),
        "{err}"
    );
}
