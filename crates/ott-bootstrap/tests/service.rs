//! The bootstrapper over real TCP on 127.0.0.1.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ott_bootstrap::{
    read_frame, request, request_until, write_frame, BootstrapError, Request, Response, Service,
};
use ott_overlay::{AddressPlan, Role, Topology};

const TOPO: &str = r#"
name = "tiny"
bootstrapper = "s1"
[[node]]
id = "s1"
role = "server"
[[node]]
id = "r1"
role = "relay"
[[node]]
id = "p1"
role = "pop"
[[node]]
id = "c1"
role = "client"
[[link]]
ends = ["s1", "r1"]
[[link]]
ends = ["r1", "p1"]
[[link]]
ends = ["p1", "c1"]
"#;

/// Generous bound for a test-side wait; never reached when things work.
const TEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A running service; stopped (and its thread joined) on drop.
struct Running {
    addr: SocketAddr,
    service: Arc<Service>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Running {
    fn start(service: Service) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("bound");
        let stop = Arc::new(AtomicBool::new(false));
        let service = Arc::new(service);
        let (s, flag) = (Arc::clone(&service), Arc::clone(&stop));
        let thread = Some(thread::spawn(move || s.serve(listener, flag)));
        Self {
            addr,
            service,
            stop,
            thread,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let result = t.join().expect("serve thread did not panic");
            if !thread::panicking() {
                result.expect("serve returned Ok");
            }
        }
    }
}

fn tiny() -> Service {
    Service::new(
        Topology::parse(TOPO, "tiny.toml").expect("valid"),
        AddressPlan::Loopback,
    )
}

fn ask_node(addr: SocketAddr, id: &str) -> Result<ott_bootstrap::Assignment, BootstrapError> {
    request(addr, &Request::Node { id: id.into() }, TEST_TIMEOUT)
}

/// Reads until the server closes the connection; fails if it stays open.
fn assert_closed_by_server(stream: &mut TcpStream) {
    stream
        .set_read_timeout(Some(TEST_TIMEOUT))
        .expect("timeout");
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connection not closed by the server: {e}"),
        }
    }
}

#[test]
fn answers_50_concurrent_clients() {
    let server = Running::start(tiny());
    let addr = server.addr;
    let handles: Vec<_> = (0..50)
        .map(|i| {
            thread::spawn(move || {
                let req = match i % 3 {
                    0 => Request::Node { id: "r1".into() },
                    1 => Request::Client {
                        id: Some("c1".into()),
                    },
                    _ => Request::Client { id: None },
                };
                let a = request(addr, &req, TEST_TIMEOUT).expect("assigned");
                assert_eq!(a.pops.len(), 1);
                assert_eq!(a.topology, "tiny");
                a.role
            })
        })
        .collect();
    let roles: Vec<Role> = handles
        .into_iter()
        .map(|h| h.join().expect("no panic"))
        .collect();
    assert_eq!(roles.iter().filter(|r| **r == Role::Relay).count(), 17);
    assert_eq!(roles.iter().filter(|r| **r == Role::Client).count(), 33);
}

#[test]
fn unknown_id_gets_a_clear_refusal() {
    let server = Running::start(tiny());
    match ask_node(server.addr, "n99") {
        Err(BootstrapError::Refused(reason)) => {
            // No ids listed to whoever asks with an unknown one.
            assert_eq!(reason, "unknown node id \"n99\" in topology tiny")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let err = request(
        server.addr,
        &Request::Client {
            id: Some("r1".into()),
        },
        TEST_TIMEOUT,
    )
    .expect_err("a relay is not a client");
    assert!(
        err.to_string()
            .starts_with("bootstrapper refused: \"r1\" is a relay"),
        "{err}"
    );
}

#[test]
fn several_requests_on_one_connection() {
    let server = Running::start(tiny());
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(TEST_TIMEOUT)).expect("timeout");
    for id in ["s1", "p1"] {
        write_frame(&mut s, &Request::Node { id: id.into() }).expect("write");
        match read_frame(&mut s).expect("answer") {
            Response::Assigned(a) => assert_eq!(a.id, id),
            Response::Refused { reason } => panic!("{reason}"),
        }
    }
}

#[test]
fn garbage_gets_an_error_and_the_service_lives_on() {
    let server = Running::start(tiny());
    // A well-framed body that is not MessagePack of a request.
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(TEST_TIMEOUT)).expect("timeout");
    s.write_all(&[0, 0, 0, 5, 0xc1, 0xff, 0x00, 0x13, 0x37])
        .expect("write");
    match read_frame(&mut s).expect("an answer") {
        Response::Refused { reason } => {
            assert!(
                reason.starts_with("malformed bootstrap message"),
                "{reason}"
            )
        }
        Response::Assigned(a) => panic!("assigned to garbage: {a:?}"),
    }
    assert_closed_by_server(&mut s);

    // An oversized length prefix: refused without reading (or allocating) the body.
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(TEST_TIMEOUT)).expect("timeout");
    s.write_all(&u32::MAX.to_be_bytes()).expect("write");
    match read_frame(&mut s).expect("an answer") {
        Response::Refused { reason } => assert!(reason.contains("too long"), "{reason}"),
        Response::Assigned(a) => panic!("assigned: {a:?}"),
    }
    assert_closed_by_server(&mut s);

    // Half a frame, then hang up.
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.write_all(&[0, 0, 1]).expect("write");
    drop(s);

    // The service still answers.
    assert_eq!(
        ask_node(server.addr, "p1").expect("assigned").role,
        Role::Pop
    );
}

#[test]
fn silent_client_is_timed_out_and_blocks_nobody() {
    let server = Running::start(tiny().with_io_timeout(Duration::from_millis(200)));
    let mut silent = TcpStream::connect(server.addr).expect("connect");
    // Others are served while the silent one waits.
    for _ in 0..5 {
        assert_eq!(
            ask_node(server.addr, "s1").expect("assigned").role,
            Role::Server
        );
    }
    // The server closes the silent connection after its I/O timeout, well before ours.
    assert_closed_by_server(&mut silent);
}

#[test]
fn a_new_connection_past_the_limit_closes_the_oldest() {
    let server = Running::start(tiny().with_max_connections(1));
    let mut holder = TcpStream::connect(server.addr).expect("connect");
    // The holder is accepted first (accept order is connection order), so this one
    // makes room by closing it, and is answered.
    assert_eq!(
        ask_node(server.addr, "s1").expect("assigned").role,
        Role::Server
    );
    assert_closed_by_server(&mut holder);
    let stats = server.service.stats();
    assert_eq!((stats.evicted, stats.busy, stats.assigned), (1, 0, 1));
}

#[test]
fn slow_connections_from_one_address_do_not_stop_a_real_node() {
    let server = Running::start(tiny());
    // 300 connections from 127.0.0.1 each sending a request one byte at a time (a
    // length prefix announcing 1,000 bytes, then the body): with a timeout per read,
    // they would hold every slot for ever.
    let mut slow: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect_timeout(&server.addr, TEST_TIMEOUT).expect("connect"))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let trickle = thread::spawn(move || {
        let frame: Vec<u8> = [0u8, 0, 3, 232].into_iter().chain([0x90; 1000]).collect();
        for b in frame.iter().cycle() {
            if flag.load(Ordering::Acquire) {
                return;
            }
            // Connections the server closed fail to write and are dropped.
            slow.retain_mut(|s| s.write_all(&[*b]).is_ok());
            thread::sleep(Duration::from_millis(20));
        }
    });
    // A real node from the same address gets its assignment at once, several times.
    for _ in 0..3 {
        let started = Instant::now();
        let a = request(
            server.addr,
            &Request::Node { id: "r1".into() },
            Duration::from_secs(2),
        )
        .expect("assigned despite 300 slow connections");
        assert_eq!(a.role, Role::Relay);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "took {took:?}");
        eprintln!("a real node got its assignment in {took:?}");
    }
    stop.store(true, Ordering::Release);
    trickle.join().expect("no panic");
    let stats = server.service.stats();
    assert!(stats.evicted >= 300 - 64, "{stats:?}");
    assert_eq!((stats.busy, stats.assigned), (0, 3), "{stats:?}");
}

#[test]
fn a_request_trickled_byte_by_byte_is_cut_at_the_deadline() {
    let server = Running::start(tiny().with_io_timeout(Duration::from_millis(500)));
    let started = Instant::now();
    let mut s = TcpStream::connect(server.addr).expect("connect");
    let mut w = s.try_clone().expect("clone");
    // One byte every 50 ms: each read is quick, only a deadline for the whole request
    // stops it.
    let trickle = thread::spawn(move || {
        for b in [0u8, 0, 3, 232].into_iter().chain([0x90; 1000]) {
            if w.write_all(&[b]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    assert_closed_by_server(&mut s);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    drop(s);
    trickle.join().expect("no panic");
    assert_eq!(server.service.stats().timed_out, 1);
}

#[test]
fn request_until_waits_for_a_late_bootstrapper() {
    // Reserve a port and free it: nobody listens there yet.
    let addr = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("bound");
    // The node starts first and keeps trying...
    let node = thread::spawn(move || {
        request_until(
            addr,
            &Request::Node { id: "r1".into() },
            Instant::now() + TEST_TIMEOUT,
        )
    });
    // ...then the bootstrapper comes up on the reserved port.
    let listener = TcpListener::bind(addr).expect("rebind the reserved port");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let service = thread::spawn(move || Arc::new(tiny()).serve(listener, flag));
    let a = node
        .join()
        .expect("no panic")
        .expect("assigned once the bootstrapper is up");
    assert_eq!(a.role, Role::Relay);
    // A refusal is not retried: it comes back at once, long before the deadline.
    let err = request_until(
        addr,
        &Request::Node { id: "zz".into() },
        Instant::now() + TEST_TIMEOUT,
    )
    .expect_err("unknown");
    assert!(matches!(err, BootstrapError::Refused(_)), "{err}");
    stop.store(true, Ordering::Release);
    service.join().expect("no panic").expect("serve ok");
}

#[test]
fn request_until_gives_up_at_the_deadline() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("bound");
    let err = request_until(
        addr,
        &Request::Client { id: None },
        Instant::now() + Duration::from_millis(500),
    )
    .expect_err("nobody listens");
    assert!(matches!(err, BootstrapError::Io(_)), "{err}");
}

#[test]
fn every_seed_node_gets_an_answer() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../topologies/seed.toml");
    let topology = Topology::load(&path).expect("seed loads");
    for plan in [AddressPlan::Loopback, AddressPlan::Links] {
        let service = Service::new(topology.clone(), plan);
        for node in &topology.nodes {
            let req = match node.role {
                Role::Client => Request::Client {
                    id: Some(node.id.clone()),
                },
                Role::Router => continue,
                _ => Request::Node {
                    id: node.id.clone(),
                },
            };
            match service.answer(&req) {
                Response::Assigned(a) => {
                    assert_eq!(a.pops.len(), topology.pops().len(), "{}", node.id);
                    assert_eq!(
                        a.neighbours.len(),
                        topology.overlay_neighbours(&node.id).len(),
                        "{}",
                        node.id
                    );
                    // The answer fits a frame.
                    let mut buf = Vec::new();
                    write_frame(&mut buf, &Response::Assigned(a)).expect("fits");
                }
                Response::Refused { reason } => panic!("{}: {reason}", node.id),
            }
        }
    }
}
