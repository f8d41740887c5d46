//! The real client against a PoP played by this test: the PoP leaves gaps in the media
//! it sends and resends what the client NACKs. The client must write every frame, whole
//! and in order; with `--no-nack` it cannot.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ott_media::Packetizer;
use ott_proto::{flags, MediaHeader, MediaKind, Message, StreamInfo};

struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_ott-client"))
        .parent()
        .expect("binaries live in a directory")
        .join(name)
}

/// Frame `n` of the sample clip: real JPEG frames, distinct, several datagrams long.
fn frame(n: u32) -> Vec<u8> {
    static CLIP: std::sync::OnceLock<ott_media::Clip> = std::sync::OnceLock::new();
    let clip = CLIP.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../videos/countdown.mjpeg");
        ott_media::Clip::load(&path).expect("sample clip")
    });
    clip.frames[n as usize % clip.frames.len()].to_vec()
}

/// Run the fake PoP for `frames` frames; every 7th datagram is not sent at first.
/// Returns what the client wrote.
fn run(net: u8, nack: bool) -> (Vec<u8>, Vec<Vec<u8>>, u64) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("client-recovery-{net}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let topo = dir.join("t.toml");
    std::fs::write(
        &topo,
        format!("name = \"t\"\nbootstrapper = \"s1\"\n[[node]]\nid = \"s1\"\nrole = \"server\"\naddress = \"127.{net}.0.1\"\n[[node]]\nid = \"p1\"\nrole = \"pop\"\naddress = \"127.{net}.0.2\"\n[[link]]\nends = [\"s1\", \"p1\"]\n"),
    )
    .expect("topology");
    let boot = format!("127.{net}.0.254:7070");
    let mut procs = Kill(Vec::new());
    procs.0.push(
        Command::new(bin("ott-bootstrap"))
            .args(["--topology", &topo.display().to_string(), "--listen", &boot])
            .stderr(Stdio::null())
            .spawn()
            .expect("bootstrapper"),
    );
    let ctrl = UdpSocket::bind(format!("127.{net}.0.2:7000")).expect("pop control");
    let data = UdpSocket::bind(format!("127.{net}.0.2:7001")).expect("pop data");
    ctrl.set_read_timeout(Some(Duration::from_millis(2)))
        .expect("timeout");
    data.set_read_timeout(Some(Duration::from_millis(2)))
        .expect("timeout");
    let out = dir.join("out.mjpeg");
    let mut args = vec![
        "--bootstrap".to_string(),
        boot.clone(),
        "--stream".into(),
        "s".into(),
    ];
    args.extend([
        "--duration".into(),
        "4".into(),
        "--output".into(),
        out.display().to_string(),
    ]);
    if !nack {
        args.push("--no-nack".into());
    }
    procs.0.push(
        Command::new(bin("ott-client"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("client"),
    );
    let info = StreamInfo::new("s", MediaKind::Mjpeg, 25_000);
    let mut packetizer = Packetizer::new(info.id);
    let mut sent_frames: Vec<Vec<u8>> = Vec::new();
    let mut held: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut viewer: Option<SocketAddr> = None;
    let mut next_frame = Instant::now();
    let mut buf = [0u8; 65536];
    let mut nacks = 0u64;
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut count = 0u32;
    let session = ott_proto::auth::SessionKey::from_bytes(SESSION);
    while Instant::now() < deadline {
        if let Ok((len, from)) = ctrl.recv_from(&mut buf) {
            let reply = match ott_proto::decode(&buf[..len]) {
                Ok(Message::Probe { nonce, sent_us }) => Some(Message::ProbeReply {
                    nonce,
                    echo_us: sent_us,
                    pop: "p1".into(),
                    path_latency_us: Some(1000),
                    hops: 1,
                    viewers: 0,
                    path: Vec::new(),
                }),
                Ok(Message::ListStreams) => Some(Message::Streams {
                    streams: vec![info.clone()],
                }),
                // The admission handshake: a cookie to the data address, then the
                // session key once it is echoed.
                Ok(Message::Join {
                    stream, data_port, ..
                }) => Some(Message::Cookie {
                    stream,
                    data_port,
                    cookie: 7,
                }),
                Ok(Message::ViewerJoin {
                    stream,
                    data_port,
                    cookie: 7,
                }) => {
                    viewer = Some(SocketAddr::new(from.ip(), data_port));
                    Some(Message::Admitted {
                        stream,
                        data_port,
                        session_key: SESSION,
                    })
                }
                _ => None,
            };
            if let Some(r) = reply {
                let _ = ctrl.send_to(&ott_proto::encode(&r).expect("encode"), from);
            }
        }
        if let Ok((len, from)) = data.recv_from(&mut buf) {
            if let Ok(Message::Nack { ranges, .. }) = ott_proto::decode(&buf[..len]) {
                nacks += 1;
                for seq in ott_media::arq::nacked_seqs(&ranges, 256) {
                    if let Some((_, d)) = held.iter().find(|(s, _)| *s == seq) {
                        let mut d = d.clone();
                        MediaHeader::mark_retransmit(&mut d);
                        let _ = data.send_to(&session.seal(&d), from);
                    }
                }
            }
        }
        let Some(to) = viewer else { continue };
        if Instant::now() >= next_frame && Instant::now() + Duration::from_millis(600) < deadline {
            next_frame += Duration::from_millis(40);
            let f = frame(sent_frames.len() as u32);
            for d in packetizer
                .packetize(&f, 0, flags::KEYFRAME)
                .expect("packetize")
            {
                let h = MediaHeader::parse(&d).expect("valid");
                count += 1;
                held.push((h.seq, d.to_vec()));
                if !count.is_multiple_of(7) {
                    let _ = data.send_to(&session.seal(&d), to);
                }
            }
            sent_frames.push(f);
        }
    }
    let client = procs.0.pop().expect("client");
    let output = client.wait_with_output().expect("client ends");
    let summary = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "client failed: {summary}");
    (std::fs::read(&out).unwrap_or_default(), sent_frames, nacks)
}

/// The session key the fake PoP gives its viewer.
const SESSION: [u8; 32] = [5; 32];

#[test]
fn lost_datagrams_are_nacked_and_every_frame_is_written_whole_and_in_order() {
    let (written, sent, nacks) = run(38, true);
    assert!(nacks > 0, "the client asked for the missing datagrams");
    let ranges = ott_media::mjpeg::split_frames(&written).expect("whole JPEG frames");
    assert!(sent.len() > 30, "the PoP sent {} frames", sent.len());
    let got: Vec<&[u8]> = ranges.iter().map(|r| &written[r.clone()]).collect();
    // The client may join a moment after the first frame; from its first frame on,
    // nothing is missing.
    let first = sent
        .iter()
        .position(|f| Some(&f[..]) == got.first().copied())
        .expect("a sent frame");
    let expected: Vec<&[u8]> = sent[first..].iter().map(Vec::as_slice).collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "every frame from the first one on"
    );
    assert!(got == expected, "frames are the ones sent, in order");
}

#[test]
fn without_nacks_the_same_gaps_lose_frames() {
    let (written, sent, nacks) = run(39, false);
    assert_eq!(nacks, 0);
    let frames = ott_media::mjpeg::split_frames(&written)
        .expect("whole JPEG frames")
        .len();
    assert!(frames > 0, "some frames got through whole");
    assert!(
        frames < sent.len() / 2,
        "{frames} of {} frames written without recovery",
        sent.len()
    );
}
