//! End-to-end tests: the real programs on loopback, each node on its own 127.x.y.z.
//!
//! Each test uses its own second octet (127.N.x.y), so tests never collide; a lock keeps
//! at most one cluster running at a time so timing stays realistic on small machines.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use ott_testkit::{parse_summary, verify_mjpeg, wait_for};

#[test]
fn two_clients_two_streams_receive_intact_frames_at_the_clip_rate() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clips = clips();
    let mut c = launch("e2e-two-streams", "seed.toml", 31);
    let secs = 6.0;
    let mut outs = Vec::new();
    for (i, clip) in clips.iter().take(2).enumerate() {
        let name = format!("v{i}");
        let out = out_file(&format!("two-streams-{name}"));
        let out_s = out.display().to_string();
        c.spawn_client(
            &name,
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
        outs.push((name, clip, out));
    }
    for (name, clip, out) in &outs {
        let summary = c
            .wait_client(name, Duration::from_secs(40))
            .expect("client ends cleanly");
        let s = parse_summary(&summary);
        let data = std::fs::read(out).expect("output written");
        let v = verify_mjpeg(&data, clip).expect("output is whole JPEG frames");
        assert!(v.frames > 0, "{name} received nothing: {summary}");
        assert_eq!(v.intact, v.frames, "{name}: every frame is a source frame");
        assert!(v.in_order, "{name}: frames follow the clip's order");
        assert_eq!(
            s.get("frames").map(String::as_str),
            Some(v.frames.to_string().as_str())
        );
        // The stream starts after PoP choice and join; allow for that, but the rate must be the clip's.
        let expected = clip.fps * secs;
        assert!(
            (v.frames as f64) > 0.6 * expected && (v.frames as f64) <= 1.05 * expected + 2.0,
            "{name}: {} frames in {secs} s at {} fps",
            v.frames,
            clip.fps
        );
    }
}

#[test]
fn one_copy_per_link_with_two_viewers_under_one_pop() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clips = clips();
    let mut c = launch("e2e-one-copy", "line.toml", 32);
    let pops: Vec<String> = c.topology.pops().iter().map(|n| n.id.clone()).collect();
    assert_eq!(pops.len(), 1, "line.toml has one PoP");
    let pop = &pops[0];
    let stream = &clips[0].name;
    for name in ["a", "b"] {
        c.spawn_client(name, None, &["--stream", stream, "--duration", "5"])
            .expect("client starts");
    }
    // Wait until both viewers are attached and media flows.
    wait_for(
        Duration::from_secs(20),
        "the PoP forwards to two viewers",
        || {
            c.status(pop)
                .map(|s| {
                    let t = &s["streams"][stream.as_str()]["traffic"];
                    t["children"].as_u64() == Some(2)
                        && t["packets_out"].as_u64().unwrap_or(0) > 100
                })
                .unwrap_or(false)
        },
    )
    .expect("viewers attached");
    let s = c.status(pop).expect("status");
    let t = &s["streams"][stream.as_str()]["traffic"];
    let inn = t["packets_in"].as_u64().expect("packets_in");
    let out = t["packets_out"].as_u64().expect("packets_out");
    let dup = t["duplicates"].as_u64().expect("duplicates");
    assert_eq!(
        dup, 0,
        "the link above the PoP carries the stream once: {s}"
    );
    assert!(
        out >= 2 * inn - 2 * 20,
        "each datagram in goes out twice: in={inn} out={out}"
    );
    assert!(
        out <= 2 * inn,
        "never more than one copy per viewer: in={inn} out={out}"
    );
    let upstream = s["streams"][stream.as_str()]["upstream"]
        .as_str()
        .expect("the PoP is joined upstream")
        .to_string();
    let up = c.status(&upstream).expect("parent status");
    let children = up["streams"][stream.as_str()]["children"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        children.len(),
        1,
        "the parent sends one copy, to the PoP: {up}"
    );
    for name in ["a", "b"] {
        c.wait_client(name, Duration::from_secs(30))
            .expect("client ends cleanly");
    }
}

#[test]
fn switching_stream_never_writes_a_frame_of_the_old_stream_after_the_switch() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clips = clips();
    let (a, b) = (&clips[0], &clips[1]);
    let mut c = launch("e2e-switch", "seed.toml", 33);
    let out = out_file("switch");
    let out_s = out.display().to_string();
    c.spawn_client(
        "v",
        None,
        &["--stream", &a.name, "--duration", "8", "--output", &out_s],
    )
    .expect("client starts");
    wait_for(Duration::from_secs(20), "the first stream flows", || {
        std::fs::metadata(&out)
            .map(|m| m.len() > 50_000)
            .unwrap_or(false)
    })
    .expect("first stream");
    c.client_say("v", &b.name).expect("switch request written");
    let summary = c
        .wait_client("v", Duration::from_secs(40))
        .expect("client ends cleanly");
    let data = std::fs::read(&out).expect("output");
    let ranges = ott_media::mjpeg::split_frames(&data).expect("whole JPEG frames");
    let in_a = |f: &[u8]| a.frames.iter().any(|x| x.as_ref() == f);
    let in_b = |f: &[u8]| b.frames.iter().any(|x| x.as_ref() == f);
    let kinds: Vec<char> = ranges
        .into_iter()
        .map(|r| {
            let f = &data[r];
            if in_a(f) {
                'a'
            } else if in_b(f) {
                'b'
            } else {
                '?'
            }
        })
        .collect();
    assert!(!kinds.contains(&'?'), "every frame is intact: {summary}");
    let first_b = kinds
        .iter()
        .position(|k| *k == 'b')
        .expect("the new stream arrived");
    assert!(first_b > 0, "the old stream played first");
    assert!(
        kinds[first_b..].iter().all(|k| *k == 'b'),
        "no frame of the old stream after the switch: {}",
        kinds.iter().collect::<String>()
    );
    assert_eq!(
        parse_summary(&summary)
            .get("stream_switches")
            .map(String::as_str),
        Some("1")
    );
}

#[test]
fn two_clients_and_nodes_share_a_host_without_address_collisions() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clips = clips();
    let mut c = launch("e2e-collide", "line.toml", 34);
    for name in ["x", "y"] {
        c.spawn_client(name, None, &["--stream", &clips[1].name, "--duration", "3"])
            .expect("client starts");
    }
    for name in ["x", "y"] {
        let out = c
            .wait_client(name, Duration::from_secs(30))
            .expect("client ends cleanly");
        let s = parse_summary(&out);
        let frames: u64 = s.get("frames").and_then(|f| f.parse().ok()).unwrap_or(0);
        assert!(frames > 0, "{name} received frames: {out}");
        assert!(!c.log(name).contains("Address already in use"));
    }
}

fn run_bin(name: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin_dir().join(name))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("program runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_malformed_topology_is_refused_naming_file_and_line() {
    let dir = work_dir("bad-topology");
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\nbootstrapper = \"s1\"\n[[node]]\nid = \"s1\"\nrole = \"server\"\n[[link]]\nends = [\"s1\", \"ghost\"]\n",
    )
    .expect("write");
    let (code, err) = run_bin(
        "ott-bootstrap",
        &[
            "--topology",
            &bad.display().to_string(),
            "--listen",
            "127.35.0.1:7070",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("bad.toml"), "names the file: {err}");
    assert!(err.contains(":7"), "names the line: {err}");
    assert!(err.contains("ghost"), "names the problem: {err}");
}

#[test]
fn a_missing_videos_directory_is_a_clear_error() {
    let (code, err) = run_bin(
        "ott-server",
        &[
            "--id",
            "s1",
            "--bootstrap",
            "127.36.0.1:7070",
            "--videos",
            "/nonexistent/clips",
            "--bootstrap-wait",
            "1",
        ],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("/nonexistent/clips"),
        "names the directory: {err}"
    );
}

#[test]
fn unknown_ids_and_garbage_datagrams_are_refused_and_counted_while_the_node_keeps_serving() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clips = clips();
    let mut c = launch("e2e-bad-input", "line.toml", 37);
    let boot = c.bootstrap.to_string();
    let key = c
        .key_file()
        .expect("the overlay has a key")
        .display()
        .to_string();
    let (code, err) = run_bin(
        "ott-node",
        &[
            "--id",
            "no-such-node",
            "--bootstrap",
            &boot,
            "--bootstrap-wait",
            "5",
            "--key-file",
            &key,
        ],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("unknown node id") && err.contains("no-such-node"),
        "{err}"
    );

    let pop = c.topology.pops()[0].id.clone();
    let ip = c
        .topology
        .node_ip(&pop, ott_overlay::AddressPlan::Loopback)
        .expect("pop address");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let garbage: [&[u8]; 4] = [b"", b"\x00\x01\x02", b"OT\x01\x00 too short", &[0xff; 1400]];
    for port in [ott_overlay::CONTROL_PORT, ott_overlay::DATA_PORT] {
        for g in garbage {
            sock.send_to(g, (ip, port)).expect("send");
        }
    }
    wait_for(
        Duration::from_secs(10),
        "garbage is counted as malformed",
        || {
            c.status(&pop)
                .map(|s| s["counters"]["malformed"].as_u64().unwrap_or(0) >= 6)
                .unwrap_or(false)
        },
    )
    .expect("malformed counted");
    c.spawn_client(
        "after",
        None,
        &["--stream", &clips[0].name, "--duration", "3"],
    )
    .expect("client starts");
    let out = c
        .wait_client("after", Duration::from_secs(30))
        .expect("client ends cleanly");
    let frames: u64 = parse_summary(&out)
        .get("frames")
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    assert!(frames > 0, "the node still serves after garbage: {out}");
}
