//! Writes the seed inputs of the fuzz corpora (`fuzz/corpus/TARGET/seed-*`): a valid
//! encoding of every control message variant, of media datagrams, of bootstrap frames,
//! and the project's topology and scenario files. Run by `fuzz/run.sh --seed`; the
//! output is committed, so a run starts from valid inputs and mutates them.
#![deny(unsafe_code)]

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ott_bootstrap::{write_frame, Request, Response};
use ott_overlay::{Role, Topology};
use ott_proto::{
    encode, flags, stream_id_for, MediaHeader, MediaKind, Message, NackRange, StreamInfo,
};

fn messages() -> Vec<(&'static str, Message)> {
    let info = StreamInfo::new("alpha", MediaKind::Mjpeg, 25_000);
    let ts = StreamInfo::new("beta", MediaKind::Ts, 30_000);
    vec![
        (
            "heartbeat",
            Message::Heartbeat {
                from: "r0".into(),
                seq: 7,
                sent_us: 123_456,
                incarnation: 2,
            },
        ),
        (
            "heartbeat_ack",
            Message::HeartbeatAck {
                from: "r1".into(),
                seq: 7,
                echo_us: 123_456,
                incarnation: u64::MAX,
            },
        ),
        (
            "announce",
            Message::Announce {
                server: "s0".into(),
                seq: 1_000_001,
                path: vec!["s0".into(), "r0".into()],
                latency_us: 2_000,
                catalogue: vec![info.clone(), ts.clone()],
            },
        ),
        (
            "withdraw",
            Message::Withdraw {
                from: "r0".into(),
                server: "s0".into(),
                seq: 9,
            },
        ),
        (
            "join_node",
            Message::Join {
                stream: stream_id_for("alpha"),
                data_port: 7001,
                from: Some("p0".into()),
            },
        ),
        (
            "join_client",
            Message::Join {
                stream: stream_id_for("beta"),
                data_port: 9000,
                from: None,
            },
        ),
        (
            "leave",
            Message::Leave {
                stream: stream_id_for("alpha"),
                data_port: 9000,
            },
        ),
        ("bye", Message::Bye { from: "r1".into() }),
        (
            "probe",
            Message::Probe {
                nonce: 0x1234_5678_9abc,
                sent_us: 42,
            },
        ),
        (
            "probe_reply",
            Message::ProbeReply {
                nonce: 0x1234_5678_9abc,
                echo_us: 42,
                pop: "p0".into(),
                path_latency_us: Some(3_000),
                hops: 2,
                viewers: 1,
            },
        ),
        ("list_streams", Message::ListStreams),
        (
            "streams",
            Message::Streams {
                streams: vec![info, ts],
            },
        ),
        (
            "nack",
            Message::Nack {
                stream: stream_id_for("alpha"),
                data_port: 7001,
                ranges: vec![
                    NackRange { first: 4, count: 2 },
                    NackRange {
                        first: u32::MAX,
                        count: 3,
                    },
                ],
            },
        ),
        (
            "error",
            Message::Error {
                reason: "unknown stream".into(),
            },
        ),
    ]
}

fn media() -> Vec<(&'static str, Vec<u8>)> {
    let h = |flags, frag_index, frag_count| MediaHeader {
        flags,
        stream: stream_id_for("alpha"),
        seq: 256,
        frame: 3,
        frag_index,
        frag_count,
        timestamp: 3600,
    };
    let datagram = |h: MediaHeader, payload: &[u8]| {
        let mut d = h.to_bytes().to_vec();
        d.extend_from_slice(payload);
        d
    };
    vec![
        (
            "keyframe",
            datagram(h(flags::KEYFRAME, 0, 1), b"\xff\xd8\xff\xd9"),
        ),
        ("fragment", datagram(h(0, 1, 2), &[0x47; 188])),
        (
            "retransmit_cached",
            datagram(h(flags::RETRANSMIT | flags::CACHED, 2, 3), b"x"),
        ),
        (
            "discontinuity",
            datagram(h(flags::DISCONTINUITY, 0, 1), b""),
        ),
    ]
}

/// Requests the programs' HTTP servers get: the status page, metrics, the client's
/// stream switch (a POST with a form body), and a few the parser must refuse.
fn http_heads() -> Vec<(&'static str, &'static str)> {
    vec![
        ("status", "GET /status HTTP/1.1\r\nHost: 127.0.0.1:7080\r\nAccept: */*\r\n\r\n"),
        ("metrics", "GET /metrics HTTP/1.0\r\n\r\n"),
        ("query", "GET /api/tree?stream=a%20b&x=%3Cscript%3E HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "switch",
            "POST /switch HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nOrigin: http://127.0.0.1:8080\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 11\r\n\r\nstream=news",
        ),
        ("chunked", "POST /switch HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("two-lengths", "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
        ("absolute", "GET http://example.com/ HTTP/1.1\r\n\r\n"),
        ("cut", "GET /status HTTP/1.1\r\nHost: 127.0"),
    ]
}

fn frame<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut b = Vec::new();
    write_frame(&mut b, msg).expect("a bootstrap message fits a frame");
    b
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(format!("seed-{name}")), bytes)
}

fn copy_toml(from: &Path, to: &Path, keep: impl Fn(&str) -> bool) -> io::Result<()> {
    let mut entries: Vec<PathBuf> = fs::read_dir(from)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if p.is_file() && name.ends_with(".toml") && keep(name) {
            write(to, name, &fs::read(&p)?)?;
        }
    }
    Ok(())
}

fn main() -> io::Result<()> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("seeds/ is inside fuzz/")
        .to_path_buf();
    let root = fuzz.parent().expect("fuzz/ is inside the project");
    let corpus = fuzz.join("corpus");
    for (name, m) in messages() {
        let bytes = encode(&m).expect("a sample message encodes");
        write(&corpus.join("control"), name, &bytes)?;
    }
    for (name, d) in media() {
        write(&corpus.join("media"), name, &d)?;
    }
    // Ids the bootstrap target's service (on the seed topology) knows, read from the file.
    let seed = Topology::load(&root.join("topologies/seed.toml")).map_err(io::Error::other)?;
    let first = |role: Role| {
        seed.with_role(role)
            .first()
            .map_or_else(String::new, |n| n.id.clone())
    };
    let requests = [
        (
            "node",
            Request::Node {
                id: first(Role::Relay),
            },
        ),
        (
            "client",
            Request::Client {
                id: Some(first(Role::Client)),
            },
        ),
        ("anonymous", Request::Client { id: None }),
    ];
    for (name, r) in &requests {
        write(&corpus.join("bootstrap"), name, &frame(r))?;
    }
    let refused = Response::Refused {
        reason: "unknown id".into(),
    };
    write(&corpus.join("bootstrap"), "refused", &frame(&refused))?;
    // Two requests on one connection: the target reads the first.
    let mut two = Vec::new();
    write_frame(&mut two, &requests[0].1).expect("fits");
    write_frame(&mut two, &requests[2].1).expect("fits");
    write(&corpus.join("bootstrap"), "two", &two)?;
    copy_toml(&root.join("topologies"), &corpus.join("topology"), |_| true)?;
    // Scenarios are checked against the seed topology in the target.
    copy_toml(
        &root.join("topologies/scenarios"),
        &corpus.join("scenario"),
        |n| n.starts_with("seed-"),
    )?;
    for (name, head) in http_heads() {
        write(&corpus.join("http_head"), name, head.as_bytes())?;
    }
    println!("seeds written under {}", corpus.display());
    Ok(())
}
