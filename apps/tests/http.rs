//! The bounded HTTP server (`httpd`) under malformed, oversized, slow and hostile
//! requests, over real TCP on loopback: the `--status` endpoint and the client's
//! `--http` page, in this process.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ott_apps::http::{self, Hub};
use ott_apps::httpd::{Limits, Server};
use ott_apps::status::{self, StatusSource};
use ott_proto::{MediaKind, StreamInfo};
use ott_testkit::wait_for;
use socket2::{Domain, Socket, Type};

/// Generous bound for a test-side wait; never reached when things work.
const TEST_TIMEOUT: Duration = Duration::from_secs(10);

struct Fixed;

impl StatusSource for Fixed {
    fn status(&self) -> serde_json::Value {
        serde_json::json!({"id": "t1", "ok": true})
    }
    fn metrics(&self) -> String {
        "ott_test_total 1\n".into()
    }
}

/// Stops the server when the test ends, however it ends.
struct Running(Server);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

fn status_server(limits: Limits) -> Running {
    let any: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
    Running(status::serve_with(any, Arc::new(Fixed), limits).expect("status server starts"))
}

fn connect_from(ip: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from((ip, 0)).into()).expect("bind");
    s.connect_timeout(&to.into(), TEST_TIMEOUT)
        .expect("connect");
    s.into()
}

/// Everything the server sends until it closes (a reset after its answer counts as a
/// close).
fn read_all(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(TEST_TIMEOUT)).expect("timeout");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server neither answered nor closed: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The head of a response whose body goes on.
fn read_head(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(TEST_TIMEOUT)).expect("timeout");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).expect("a response head");
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Send `raw`, return the whole answer.
fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect_timeout(&addr, TEST_TIMEOUT).expect("connect");
    s.write_all(raw).expect("send");
    read_all(&mut s)
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("")
}

fn get(addr: SocketAddr, path: &str) -> String {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
    )
}

#[test]
fn status_and_metrics_are_served_with_the_http_counters() {
    let server = status_server(Limits::default());
    let addr = server.0.local_addr();
    let a = get(addr, "/status");
    assert_eq!(status_line(&a), "HTTP/1.1 200 OK", "{a}");
    assert!(a.contains("\"ok\": true"), "{a}");
    // HTTP/1.0 without Host, as the launcher's probe sends it.
    let a = exchange(addr, b"GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status_line(&a), "HTTP/1.1 200 OK", "{a}");
    assert!(a.contains("ott_test_total 1\n"), "{a}");
    assert!(
        a.contains("ott_http_requests_total{server=\"status\"} 2\n"),
        "{a}"
    );
    assert!(
        a.contains("# TYPE ott_http_too_large_total counter\n"),
        "{a}"
    );
}

#[test]
fn malformed_requests_get_400_and_the_server_lives_on() {
    let server = status_server(Limits::default());
    let addr = server.0.local_addr();
    for (raw, want) in [
        (&b"GARBAGE\r\n\r\n"[..], "HTTP/1.1 400 Bad Request"),
        (b"GET / HTTP/9.9\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            "HTTP/1.1 400 Bad Request",
        ),
        (
            b"POST /status HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 501 Not Implemented",
        ),
        (
            b"POST /status HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
            "HTTP/1.1 413 Content Too Large",
        ),
        (b"GET /nope HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (
            b"DELETE /status HTTP/1.1\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
    ] {
        let a = exchange(addr, raw);
        assert_eq!(
            status_line(&a),
            want,
            "{}: {a}",
            String::from_utf8_lossy(raw)
        );
    }
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let a = exchange(
        addr,
        format!("GET /status HTTP/1.1\r\n{many}\r\n").as_bytes(),
    );
    assert_eq!(
        status_line(&a),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let s = server.0.stats().snapshot();
    assert_eq!((s.bad_requests, s.too_large), (4, 2), "{s:?}");
    assert_eq!(status_line(&get(addr, "/status")), "HTTP/1.1 200 OK");
}

#[test]
fn a_1_mb_header_gets_431_and_the_connection_closes() {
    let server = status_server(Limits::default());
    let addr = server.0.local_addr();
    let mut s = TcpStream::connect_timeout(&addr, TEST_TIMEOUT).expect("connect");
    let mut w = s.try_clone().expect("clone");
    // The sender goes on while we read: the server answers after 8 KiB, not at the end.
    let sender = thread::spawn(move || {
        let mut sent = 0usize;
        let _ = w.set_write_timeout(Some(TEST_TIMEOUT));
        if w.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: ")
            .is_err()
        {
            return sent;
        }
        let chunk = [b'a'; 16 * 1024];
        while sent < 1 << 20 {
            match w.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => return sent,
            }
        }
        let _ = w.write_all(b"\r\n\r\n");
        sent
    });
    let a = read_all(&mut s);
    assert_eq!(
        status_line(&a),
        "HTTP/1.1 431 Request Header Fields Too Large",
        "{a}"
    );
    assert!(a.contains("over 8192 bytes"), "{a}");
    drop(s);
    let sent = sender.join().expect("sender");
    eprintln!("the client got its 431 and the close after sending {sent} bytes");
    assert_eq!(server.0.stats().snapshot().too_large, 1);
    // Not the whole megabyte went into the server: it reads 8 KiB of a head, then at
    // most 64 KiB more while closing (the rest is the kernel's buffers or never sent).
    assert_eq!(status_line(&get(addr, "/status")), "HTTP/1.1 200 OK");
}

#[test]
fn a_head_trickled_byte_by_byte_is_cut_at_the_deadline() {
    let limits = Limits {
        head_deadline: Duration::from_millis(600),
        ..Limits::default()
    };
    let server = status_server(limits);
    let addr = server.0.local_addr();
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, TEST_TIMEOUT).expect("connect");
    let mut w = s.try_clone().expect("clone");
    // One byte every 50 ms: every read is quick, only the deadline for the whole head
    // stops it.
    let trickle = thread::spawn(move || {
        for b in b"GET /status HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain([b'a'; 400].iter())
        {
            if w.write_all(&[*b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    let a = read_all(&mut s);
    let took = started.elapsed();
    drop(s);
    assert_eq!(status_line(&a), "HTTP/1.1 408 Request Timeout", "{a}");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "answered after {took:?}"
    );
    let _ = trickle.join();
    assert_eq!(server.0.stats().snapshot().head_timeouts, 1);
}

#[test]
fn three_hundred_idle_connections_do_not_lock_out_a_real_request() {
    let server = status_server(Limits::default());
    let addr = server.0.local_addr();
    // 150 idle connections from the address the real request comes from, 150 from 30
    // others: both the per-address and the global cap are full many times over.
    let mut idle = Vec::new();
    let started = Instant::now();
    for i in 0..300u32 {
        let ip = if i % 2 == 0 {
            Ipv4Addr::LOCALHOST
        } else {
            Ipv4Addr::new(127, 0, 0, 2 + (i % 30) as u8)
        };
        idle.push(connect_from(ip, addr));
    }
    eprintln!("300 idle connections opened in {:?}", started.elapsed());
    for path in ["/status", "/metrics"] {
        let started = Instant::now();
        let a = get(addr, path);
        let took = started.elapsed();
        assert_eq!(status_line(&a), "HTTP/1.1 200 OK", "{a}");
        assert!(took < Duration::from_secs(2), "{path} took {took:?}");
        eprintln!("{path} answered in {took:?} with 300 idle connections open");
    }
    let s = server.0.stats().snapshot();
    assert!(s.accepted >= 302, "{s:?}");
    // 64 connections held at most: every other idle one was closed to make room.
    assert!(s.evicted >= 300 - 64, "{s:?}");
    assert_eq!(s.refused + s.refused_per_addr, 0, "{s:?}");
    // Those evicted got a 503 and a close.
    let a = read_all(&mut idle[0]);
    assert_eq!(status_line(&a), "HTTP/1.1 503 Service Unavailable", "{a}");
    // The count is in /metrics.
    let metrics = get(addr, "/metrics");
    let shown: u64 = metrics
        .split("ott_http_evicted_total{server=\"status\"} ")
        .nth(1)
        .and_then(|r| r.lines().next())
        .and_then(|v| v.parse().ok())
        .expect("evicted count in /metrics");
    assert!(shown >= s.evicted, "{metrics}");
}

#[test]
fn connections_past_their_head_are_not_evicted_new_ones_are_refused() {
    let limits = Limits {
        max_connections: 4,
        max_per_addr: 2,
        ..Limits::default()
    };
    let hub = Arc::new(Hub::new());
    let info = StreamInfo::new("t", MediaKind::Ts, 0);
    hub.set_catalogue(std::slice::from_ref(&info));
    hub.set_watching(&info);
    let (tx, _rx) = crossbeam_channel::bounded(4);
    let any: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
    let server = Running(http::serve_with(any, hub.clone(), tx, limits).expect("serve"));
    let addr = server.0.local_addr();
    // Two streaming readers from 127.0.0.1: the per-address cap is full of real work.
    let mut readers = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect_timeout(&addr, TEST_TIMEOUT).expect("connect");
        s.write_all(b"GET /stream HTTP/1.1\r\n\r\n").expect("send");
        readers.push(s);
    }
    for r in &mut readers {
        let head = read_head(r);
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\n"),
            "{head}"
        );
    }
    let a = get(addr, "/streams");
    assert_eq!(status_line(&a), "HTTP/1.1 503 Service Unavailable", "{a}");
    assert_eq!(server.0.stats().snapshot().refused_per_addr, 1);
    // Another address still gets in.
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 9), addr);
    s.write_all(b"GET /streams HTTP/1.1\r\n\r\n").expect("send");
    assert_eq!(status_line(&read_all(&mut s)), "HTTP/1.1 200 OK");
    // The streams still flow.
    hub.frame(&Bytes::from_static(&[0x47; 188]), true);
    for r in &mut readers {
        let mut pkt = [0u8; 188];
        r.read_exact(&mut pkt).expect("a TS packet");
        assert_eq!(pkt[0], 0x47);
    }
}

/// The client's page with one hostile stream name.
struct Page {
    server: Running,
    hub: Arc<Hub>,
    switches: crossbeam_channel::Receiver<String>,
}

const EVIL: &str = "</script><script>alert(1)</script>";

fn page_server(limits: Limits) -> Page {
    let hub = Arc::new(Hub::new());
    let evil = StreamInfo::new(EVIL, MediaKind::Mjpeg, 25_000);
    let plain = StreamInfo::new("countdown", MediaKind::Ts, 25_000);
    hub.set_catalogue(&[evil.clone(), plain]);
    hub.set_watching(&evil);
    let (tx, switches) = crossbeam_channel::bounded(4);
    let any: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
    let server = Running(http::serve_with(any, hub.clone(), tx, limits).expect("serve"));
    Page {
        server,
        hub,
        switches,
    }
}

fn post_switch(addr: SocketAddr, stream: &str, extra: &str) -> String {
    let body = format!("stream={stream}");
    exchange(
        addr,
        format!(
            "POST /switch HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

#[test]
fn a_stream_name_is_escaped_in_the_page() {
    let p = page_server(Limits::default());
    let addr = p.server.0.local_addr();
    let escaped = "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;";
    let encoded = http::path_encode(EVIL);
    // The list: the name as HTML text, and percent-encoded in the link.
    let a = get(addr, "/");
    assert_eq!(status_line(&a), "HTTP/1.1 200 OK", "{a}");
    assert!(!a.contains("alert(1)</script>"), "{a}");
    assert!(!a.contains("<script>"), "no script on the list: {a}");
    assert!(a.contains(&format!(">{escaped}</a>")), "{a}");
    assert!(a.contains(&format!("href=\"/watch/{encoded}\"")), "{a}");
    // The page that plays it: in the title, in attributes, and in the script.
    let a = get(addr, &format!("/watch/{encoded}"));
    assert_eq!(status_line(&a), "HTTP/1.1 200 OK", "{a}");
    assert!(!a.contains("alert(1)</script>"), "{a}");
    assert_eq!(a.matches("<script>").count(), 1, "only the page's own: {a}");
    assert_eq!(
        a.matches("</script>").count(),
        1,
        "only the page's own: {a}"
    );
    assert!(a.contains(&format!("<title>ott: {escaped}</title>")), "{a}");
    assert!(a.contains(&format!("alt=\"{escaped}\"")), "{a}");
    assert!(a.contains(&format!("src=\"/mjpeg/{encoded}\"")), "{a}");
    // In the script, as JSON the browser reads back to the same name.
    let cfg = a
        .split("const cfg = ")
        .nth(1)
        .and_then(|r| r.split(";\n").next())
        .expect("the page's script holds the name");
    assert!(!cfg.contains('<') && !cfg.contains('>'), "{cfg}");
    let back: serde_json::Value = serde_json::from_str(cfg).expect("valid JSON");
    assert_eq!(back["name"], EVIL);
    assert!(a.contains("Content-Security-Policy: frame-ancestors 'none'\r\n"));
    assert!(a.contains("X-Content-Type-Options: nosniff\r\n"));
    // Another stream's page on the client offers a switch, with the name escaped.
    let a = get(addr, "/watch/countdown");
    assert!(
        a.contains("<input type=\"hidden\" name=\"stream\" value=\"countdown\">"),
        "{a}"
    );
    assert!(a.contains(&format!("instead of {escaped}")), "{a}");
    // The JSON list is JSON (the name escaped by the encoder), never HTML.
    let list = get(addr, "/streams");
    assert!(
        list.contains("Content-Type: application/json\r\n"),
        "{list}"
    );
    let _ = &p.hub;
}

#[test]
fn switch_is_post_only_and_same_origin_only() {
    let p = page_server(Limits::default());
    let addr = p.server.0.local_addr();
    // GET changes nothing.
    let a = get(addr, "/switch?stream=countdown");
    assert_eq!(status_line(&a), "HTTP/1.1 405 Method Not Allowed", "{a}");
    assert!(a.contains("Allow: POST\r\n"), "{a}");
    // A cross-origin POST (a form on another site) is refused.
    let a = post_switch(addr, "countdown", "Origin: http://evil.example\r\n");
    assert_eq!(status_line(&a), "HTTP/1.1 403 Forbidden", "{a}");
    let a = post_switch(addr, "countdown", "Referer: http://evil.example/x\r\n");
    assert_eq!(status_line(&a), "HTTP/1.1 403 Forbidden", "{a}");
    let a = exchange(
        addr,
        b"POST /switch HTTP/1.1\r\nHost: rebind.example:8000\r\nOrigin: http://rebind.example:8000\r\nContent-Length: 16\r\n\r\nstream=countdown",
    );
    assert_eq!(status_line(&a), "HTTP/1.1 403 Forbidden", "{a}");
    assert!(p.switches.try_recv().is_err(), "nothing switched");
    assert_eq!(p.server.0.stats().snapshot().forbidden, 3);
    // A stream that is not in the catalogue is not passed on.
    let a = post_switch(addr, "nope", "");
    assert_eq!(status_line(&a), "HTTP/1.1 404 Not Found", "{a}");
    // From the page itself, and from curl (no Origin, no Referer): switched.
    let a = post_switch(addr, "countdown", &format!("Origin: http://{addr}\r\n"));
    assert_eq!(status_line(&a), "HTTP/1.1 303 See Other", "{a}");
    assert_eq!(p.switches.try_recv().as_deref(), Ok("countdown"));
    let a = post_switch(addr, "countdown", "");
    assert_eq!(status_line(&a), "HTTP/1.1 303 See Other", "{a}");
    assert_eq!(p.switches.try_recv().as_deref(), Ok("countdown"));
}

#[test]
fn a_streaming_reader_that_stops_reading_is_dropped() {
    let limits = Limits {
        write_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let p = page_server(limits);
    let addr = p.server.0.local_addr();
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("small buffer");
    sock.connect_timeout(&addr.into(), TEST_TIMEOUT)
        .expect("connect");
    let mut s: TcpStream = sock.into();
    s.write_all(b"GET /stream.mjpeg HTTP/1.1\r\n\r\n")
        .expect("send");
    // Never read. The hub keeps producing; the server must give up on us.
    let frame = Bytes::from(vec![0xffu8; 256 * 1024]);
    wait_for(TEST_TIMEOUT, "the slow reader is dropped", || {
        p.hub.frame(&frame, true);
        p.server.0.stats().snapshot().slow_readers == 1
    })
    .expect("dropped");
    // The client itself is fine.
    assert_eq!(status_line(&get(addr, "/streams")), "HTTP/1.1 200 OK");
    drop(s);
}
