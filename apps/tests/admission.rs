//! Viewer admission and bounded forwarder state with the real programs on loopback
//! (127.77), without an overlay key (so nothing but admission and the session tags
//! stands in the way): a Join naming a bystander's port gets the bystander no stream,
//! media forged straight to a viewer's port is never written, and a flood of datagrams
//! with new stream ids is counted at a relay without growing its memory.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::{bin_dir, clips, root, work_dir, ONE_AT_A_TIME};
use ott_overlay::{AddressPlan, CONTROL_PORT, DATA_PORT};
use ott_proto::{flags, MediaHeader, Message};
use ott_testkit::{verify_mjpeg, wait_for, Cluster, KeyMode, LaunchOptions};

fn ip_of(c: &Cluster, id: &str) -> IpAddr {
    IpAddr::V4(
        c.topology
            .node_ip(id, AddressPlan::Loopback)
            .expect("node address"),
    )
}

fn counter(c: &Cluster, id: &str, name: &str) -> u64 {
    c.status(id)
        .ok()
        .and_then(|s| s["counters"][name].as_u64())
        .unwrap_or(0)
}

/// A media datagram ahead of the live sequence numbers holding a whole JPEG, with a
/// made-up trailer where a session tag would be.
fn forged_media(stream: u32, seq: u32) -> Vec<u8> {
    let h = MediaHeader {
        flags: flags::KEYFRAME,
        stream,
        seq,
        frame: seq,
        frag_index: 0,
        frag_count: 1,
        timestamp: 0,
    };
    let mut d = h.to_bytes().to_vec();
    d.extend_from_slice(b"\xff\xd8FORGED FRAME\xff\xd9");
    d.extend_from_slice(&[0x5a; 16]);
    d
}

/// The pid of the `ott-node` of `id` in this cluster (found by its command line,
/// which names the cluster's own bootstrapper).
fn pid_of(c: &Cluster, id: &str) -> u32 {
    let want = format!("--id\0{id}\0--bootstrap\0{}\0", c.bootstrap);
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|b| String::from_utf8_lossy(&b).contains(&want))
        })
        .expect("the node's process")
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[test]
fn forged_joins_and_media_get_nowhere_and_a_new_stream_flood_allocates_nothing() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clips = clips();
    let clip = &clips[0];
    let stream = ott_proto::stream_id_for(&clip.name);
    let name = "admission";
    let mut c = Cluster::start_with(
        LaunchOptions {
            bin_dir: bin_dir(),
            topology: root().join("topologies").join("line.toml"),
            videos: root().join("videos"),
            net: 77,
            work_dir: work_dir(name),
            log_filter: "info".into(),
        },
        Vec::new(),
        KeyMode::None,
    )
    .expect("cluster starts");
    c.wait_converged(Duration::from_secs(30))
        .expect("tree forms");
    let out = common::out_file(name);
    let out_s = out.display().to_string();
    c.spawn_client(
        "viewer",
        None,
        &[
            "--stream",
            &clip.name,
            "--duration",
            "8",
            "--output",
            &out_s,
        ],
    )
    .expect("client starts");
    // The viewer's data address, as the PoP lists it ("client@ip:port").
    let mut viewer: Option<SocketAddr> = None;
    wait_for(Duration::from_secs(20), "the PoP admits the viewer", || {
        viewer = c.status("p1").ok().and_then(|s| {
            s["streams"][&clip.name]["children"]
                .as_array()?
                .iter()
                .find_map(|v| v.as_str()?.strip_prefix("client@")?.parse().ok())
        });
        viewer.is_some()
    })
    .expect("viewer admitted");
    let viewer = viewer.expect("viewer address");

    // A bystander, and an attacker on the same host naming the bystander's port in
    // its Joins, at the PoP and at the nodes that take no viewers.
    let bystander = UdpSocket::bind("127.0.0.1:0").expect("bind");
    bystander.set_nonblocking(true).expect("nonblocking");
    let by_port = bystander.local_addr().expect("bound").port();
    let attacker = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let join = ott_proto::encode(&Message::Join {
        stream,
        data_port: by_port,
        from: None,
    })
    .expect("encodes");
    let guesses: Vec<Vec<u8>> = (0..50u64)
        .map(|g| {
            ott_proto::encode(&Message::ViewerJoin {
                stream,
                data_port: by_port,
                cookie: g.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            })
            .expect("encodes")
        })
        .collect();
    for node in ["s1", "r1", "r2", "p1"] {
        let to = (ip_of(&c, node), CONTROL_PORT);
        attacker.send_to(&join, to).expect("send");
        for g in &guesses {
            attacker.send_to(g, to).expect("send");
        }
    }
    // Media forged straight to the viewer's port, from the PoP's own data address
    // (the source a viewer would expect) and from elsewhere.
    let from_pop = UdpSocket::bind(SocketAddr::new(ip_of(&c, "p1"), 0)).expect("bind");
    for i in 0..200u32 {
        let m = forged_media(stream, 0x4000_0000 + i);
        from_pop.send_to(&m, viewer).expect("send");
        attacker.send_to(&m, viewer).expect("send");
    }

    // Flood r1 (a relay) with media of 20,000 stream ids nobody routed.
    let r1 = pid_of(&c, "r1");
    let rss_before = rss_kib(r1);
    let unrouted_before = counter(&c, "r1", "unrouted");
    let flood = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let r1_data = (ip_of(&c, "r1"), DATA_PORT);
    let n = 20_000u32;
    for i in 0..n {
        let h = MediaHeader {
            flags: flags::KEYFRAME,
            stream: 0x5000_0000 + i,
            seq: i,
            frame: i,
            frag_index: 0,
            frag_count: 1,
            timestamp: 0,
        };
        let mut d = h.to_bytes().to_vec();
        d.extend_from_slice(&[0x11; 1000]);
        flood.send_to(&d, r1_data).expect("send");
        if i % 200 == 199 {
            // Let the relay read: the receive buffer is small, and each datagram
            // should arrive to be counted.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    wait_for(
        Duration::from_secs(10),
        "the relay counts the unrouted datagrams",
        || counter(&c, "r1", "unrouted") >= unrouted_before + u64::from(n) / 2,
    )
    .expect("unrouted datagrams counted");
    let rss_after = rss_kib(r1);
    // Before, each new stream id cost ~81 KB: 20,000 of them 1.6 GB.
    assert!(
        rss_after < rss_before + 16 * 1024,
        "r1's RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    eprintln!(
        "r1: {} unrouted datagrams counted; RSS {rss_before} KiB before, {rss_after} KiB after",
        counter(&c, "r1", "unrouted") - unrouted_before
    );

    let summary = c
        .wait_client("viewer", Duration::from_secs(40))
        .expect("client ends cleanly");
    // The bystander got no media (at most the PoP's cookies, which it never echoed).
    let mut buf = [0u8; 2048];
    let mut media = 0;
    let mut cookies = 0;
    while let Ok((len, _)) = bystander.recv_from(&mut buf) {
        if buf[..len].starts_with(b"OT") {
            media += 1;
        } else if matches!(ott_proto::decode(&buf[..len]), Ok(Message::Cookie { .. })) {
            cookies += 1;
        }
    }
    assert_eq!(media, 0, "the bystander received media");
    assert!(cookies <= 51, "{cookies} cookies");
    let status = c.status("p1").expect("status");
    assert!(
        !status.to_string().contains(&format!(":{by_port}")),
        "the bystander is a child at the PoP: {status}"
    );
    // The viewer wrote the clip's frames only.
    let data = std::fs::read(&out).expect("output written");
    let v = verify_mjpeg(&data, clip).expect("whole JPEG frames");
    assert!(
        v.frames > 25,
        "the viewer got the stream: {v:?} ({summary})"
    );
    assert_eq!(
        v.intact, v.frames,
        "every frame written is the clip's: {v:?}"
    );
    assert!(
        !data.windows(6).any(|w| w == b"FORGED"),
        "a forged frame was written"
    );
    c.stop();
}
