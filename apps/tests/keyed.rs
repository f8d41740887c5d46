//! The shared overlay key (`--key-file`) with the real programs on loopback (127.63–64):
//! a keyed overlay delivers intact frames while datagrams forged without the key are
//! counted as auth failures and change nothing a viewer writes; without a key the
//! programs still run, with one warning; a short key file is refused.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::{bin_dir, clips, launch, out_file, root, work_dir, ONE_AT_A_TIME};
use ott_overlay::{AddressPlan, CONTROL_PORT, DATA_PORT};
use ott_proto::{flags, MediaHeader, Message, StreamInfo};
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

/// Control messages an outsider who read docs/protocol.md would forge.
fn forged_control(server: &str, stream: u32, port: u16) -> Vec<Vec<u8>> {
    let msgs = [
        Message::Heartbeat {
            from: server.into(),
            seq: 1,
            sent_us: 1,
            incarnation: u64::MAX,
        },
        Message::Announce {
            server: server.into(),
            seq: u64::MAX / 2,
            path: vec![server.into()],
            latency_us: 0,
            catalogue: vec![StreamInfo::new(
                "forged",
                ott_proto::MediaKind::Mjpeg,
                25_000,
            )],
        },
        Message::Bye {
            from: server.into(),
        },
        Message::Join {
            stream,
            data_port: port,
            from: Some("r1".into()),
        },
    ];
    let mut out: Vec<Vec<u8>> = msgs
        .iter()
        .map(|m| ott_proto::encode(m).expect("encodes"))
        .collect();
    // A sealed layout with a made-up tag.
    let mut sealed = b"OC\x01".to_vec();
    sealed.extend_from_slice(&[7u8; 16]);
    sealed.extend_from_slice(&out[0]);
    sealed.extend_from_slice(&[0xab; 16]);
    out.push(sealed);
    out
}

/// A media datagram of `stream` far ahead of the live sequence numbers, with a
/// made-up trailer where the tag would be.
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
    // A whole JPEG the viewer would write if it got through.
    d.extend_from_slice(b"\xff\xd8FORGED FRAME\xff\xd9");
    d.extend_from_slice(&[0x5a; 16]);
    d
}

#[test]
fn a_keyed_overlay_drops_forged_datagrams_and_viewers_write_only_intact_frames() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clips = clips();
    let clip = &clips[0];
    let stream = ott_proto::stream_id_for(&clip.name);
    let mut c = launch("keyed-forgery", "line.toml", 63);
    assert!(c.key_file().is_some_and(|k| k.exists()));
    let out = out_file("keyed-forgery");
    let out_s = out.display().to_string();
    c.spawn_client(
        "viewer",
        None,
        &[
            "--stream",
            &clip.name,
            "--duration",
            "6",
            "--output",
            &out_s,
        ],
    )
    .expect("client starts");
    // The viewer is watching: the PoP forwards the stream.
    wait_for(
        Duration::from_secs(20),
        "the PoP forwards the stream",
        || {
            c.status("p1")
                .map(|s| {
                    s["streams"][&clip.name]["children"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
                })
                .unwrap_or(false)
        },
    )
    .expect("viewer attached");

    // The outsider: forged source addresses are easy on loopback, so it sends from the
    // server's own IP (a member's address), and from an address of its own.
    let from_server = UdpSocket::bind(SocketAddr::new(ip_of(&c, "s1"), 0)).expect("bind");
    let own = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let own_port = own.local_addr().expect("bound").port();
    own.set_nonblocking(true).expect("nonblocking");
    let control = forged_control("s1", stream, own_port);
    let before: Vec<(String, u64)> = ["r1", "r2", "p1"]
        .iter()
        .map(|n| (n.to_string(), counter(&c, n, "auth_failed")))
        .collect();
    let mut sent = 0u64;
    for round in 0..5u32 {
        for node in ["r1", "r2", "p1"] {
            let ip = ip_of(&c, node);
            for sock in [&from_server, &own] {
                for d in &control {
                    sock.send_to(d, (ip, CONTROL_PORT)).expect("send");
                }
                let m = forged_media(stream, 0x4000_0000 + round);
                sock.send_to(&m, (ip, DATA_PORT)).expect("send");
            }
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every forged datagram is counted as an auth failure where it arrived. At the PoP,
    // the outsider's own plain control messages are not a viewer's: refused too.
    let per_node = sent * 2 * (control.len() as u64 + 1);
    wait_for(
        Duration::from_secs(10),
        "every forged datagram is counted as an auth failure",
        || {
            before
                .iter()
                .all(|(n, b)| counter(&c, n, "auth_failed") >= b + per_node)
        },
    )
    .expect("auth failures counted");

    let summary = c
        .wait_client("viewer", Duration::from_secs(40))
        .expect("client ends cleanly");
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
    assert!(v.in_order, "{v:?}");
    assert!(
        !data.windows(6).any(|w| w == b"FORGED"),
        "a forged frame was written"
    );
    // The forged Join named the outsider's port: nothing was ever sent there.
    let mut buf = [0u8; 2048];
    assert!(
        own.recv_from(&mut buf).is_err(),
        "an outsider received a datagram"
    );
    // The forged heartbeats, announcements and byes changed nothing: the tree is whole.
    let status = c.status("p1").expect("status");
    assert!(!status["parent"].is_null(), "{status}");
    assert!(
        !status.to_string().contains("forged"),
        "a forged announcement reached the catalogue"
    );
}

#[test]
fn without_a_key_the_overlay_runs_with_one_warning() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clips = clips();
    let mut c = Cluster::start_with(
        LaunchOptions {
            bin_dir: bin_dir(),
            topology: root().join("topologies").join("line.toml"),
            videos: root().join("videos"),
            net: 64,
            work_dir: work_dir("keyed-none"),
            log_filter: "info".into(),
        },
        Vec::new(),
        KeyMode::None,
    )
    .expect("cluster starts");
    assert!(c.key_file().is_none());
    c.wait_converged(Duration::from_secs(30))
        .expect("tree forms");
    c.spawn_client(
        "viewer",
        None,
        &["--stream", &clips[0].name, "--duration", "2"],
    )
    .expect("client starts");
    let out = c
        .wait_client("viewer", Duration::from_secs(30))
        .expect("client ends cleanly");
    let frames: u64 = ott_testkit::parse_summary(&out)
        .get("frames")
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    assert!(frames > 0, "{out}");
    for name in ["bootstrap", "s1", "r1", "p1"] {
        let warnings = c.log(name).matches("no --key-file").count();
        assert_eq!(warnings, 1, "{name} warns once");
    }
    assert_eq!(counter(&c, "p1", "auth_failed"), 0);
}

#[test]
fn a_short_or_missing_key_file_is_refused_naming_the_file() {
    let dir = work_dir("keyed-bad-file");
    std::fs::create_dir_all(&dir).expect("dir");
    let short = dir.join("short.key");
    std::fs::write(&short, [7u8; 16]).expect("write");
    let missing = dir.join("missing.key");
    for (bin, file) in [
        ("ott-node", &short),
        ("ott-server", &missing),
        ("ott-bootstrap", &short),
    ] {
        let mut cmd = std::process::Command::new(bin_dir().join(bin));
        match bin {
            "ott-bootstrap" => cmd.args([
                "--topology",
                "topologies/line.toml",
                "--listen",
                "127.0.0.1:0",
            ]),
            "ott-server" => cmd.args(["--id", "s1", "--videos", "videos"]),
            _ => cmd.args(["--id", "r1"]),
        };
        let out = cmd
            .current_dir(root())
            .arg("--key-file")
            .arg(file)
            .args(
                ["--bootstrap-wait", "1"]
                    .iter()
                    .filter(|_| bin != "ott-bootstrap"),
            )
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bin} accepted {}", file.display());
        assert!(
            err.contains(&file.display().to_string()),
            "{bin} names the file: {err}"
        );
        if file == &short {
            assert!(err.contains("at least 32"), "{bin} says why: {err}");
        }
    }
}
