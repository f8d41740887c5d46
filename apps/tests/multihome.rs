//! A multi-homed PoP, with the real programs on loopback (127.61.x.y).
//!
//! The shape of the namespace emulator's bug: a PoP known first by one address (the
//! one facing the core) while its viewer reaches it at another (the one facing the
//! viewer). Here the PoP `p1` has `addresses = ["127.61.0.3", "127.61.1.3"]`; the relay
//! shares 127.61.0.0/24 with the first, the client `c1` (127.61.1.9) with the second,
//! so the bootstrapper gives `c1` the second. The PoP must listen on both, answer
//! from the one it was asked on, and the client must take it for the PoP.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use ott_bootstrap::Request;
use ott_proto::Message;
use ott_testkit::{parse_summary, verify_mjpeg, Cluster, LaunchOptions};

const TOPOLOGY: &str = r#"
name = "multihome"
bootstrapper = "s1"
[[node]]
id = "s1"
role = "server"
address = "127.61.0.1"
[[node]]
id = "r1"
role = "relay"
address = "127.61.0.2"
[[node]]
id = "p1"
role = "pop"
addresses = ["127.61.0.3", "127.61.1.3"]
[[node]]
id = "c1"
role = "client"
address = "127.61.1.9"
[[link]]
ends = ["s1", "r1"]
[[link]]
ends = ["r1", "p1"]
[[link]]
ends = ["p1", "c1"]
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}

/// Send `msg` from `sock` to `to` and return the first control answer and who sent it.
fn ask(sock: &UdpSocket, to: SocketAddr, msg: &Message) -> (Message, SocketAddr) {
    let bytes = ott_proto::encode(msg).expect("encodes");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 65536];
    loop {
        assert!(Instant::now() < deadline, "no answer from {to}");
        sock.send_to(&bytes, to).expect("send");
        if let Ok((len, from)) = sock.recv_from(&mut buf) {
            if let Ok(answer) = ott_proto::decode(&buf[..len]) {
                return (answer, from);
            }
        }
    }
}

#[test]
fn a_pop_reached_at_its_second_address_serves_a_viewer() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = work_dir("multihome");
    std::fs::create_dir_all(&dir).expect("work dir");
    let topo = dir.join("multihome.toml");
    std::fs::write(&topo, TOPOLOGY).expect("topology written");
    let mut c = Cluster::start(LaunchOptions {
        bin_dir: bin_dir(),
        topology: topo,
        videos: root().join("videos"),
        net: 61,
        work_dir: dir.join("run"),
        log_filter: "info".into(),
    })
    .expect("cluster starts");
    c.wait_converged(Duration::from_secs(30))
        .expect("tree forms");

    // The bootstrapper gives c1 the PoP's second address, and both.
    let a = ott_bootstrap::request(
        c.bootstrap,
        &Request::Client {
            id: Some("c1".into()),
        },
        Duration::from_secs(5),
    )
    .expect("c1 is assigned");
    assert_eq!(a.pops.len(), 1);
    assert_eq!(a.pops[0].ctrl, SocketAddr::new(ip("127.61.1.3"), 7000));
    assert_eq!(a.pops[0].addrs, vec![ip("127.61.0.3"), ip("127.61.1.3")]);

    // Asked at either address, the PoP answers from that address.
    let probe_sock = UdpSocket::bind("127.61.1.99:0").expect("bind");
    probe_sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    for at in ["127.61.1.3", "127.61.0.3"] {
        let to = SocketAddr::new(ip(at), 7000);
        let (answer, from) = ask(
            &probe_sock,
            to,
            &Message::Probe {
                nonce: 7,
                sent_us: 1,
            },
        );
        assert!(
            matches!(answer, Message::ProbeReply { nonce: 7, .. }),
            "{answer:?}"
        );
        assert_eq!(from, to, "answered from another address than asked");
    }

    // The viewer, who knows p1 by its second address, gets the stream.
    let clips = clips();
    let clip = &clips[0];
    let out = out_file("multihome-c1");
    let out_s = out.display().to_string();
    c.spawn_client(
        "c1",
        Some("c1"),
        &[
            "--stream",
            &clip.name,
            "--duration",
            "4",
            "--output",
            &out_s,
        ],
    )
    .expect("client starts");
    let summary = c
        .wait_client("c1", Duration::from_secs(40))
        .expect("client ends cleanly");
    let s = parse_summary(&summary);
    assert_eq!(s.get("pop").map(String::as_str), Some("p1"), "{summary}");
    let data = std::fs::read(&out).expect("output written");
    let v = verify_mjpeg(&data, clip).expect("whole JPEG frames");
    assert!(
        v.frames as f64 > 0.5 * clip.fps * 4.0,
        "c1 received {} frames: {summary}\n{}",
        v.frames,
        c.log("c1")
    );
    assert_eq!(v.intact, v.frames);
    assert!(v.in_order);
}
