//! The forwarding thread alone, on loopback sockets: fan-out, duplicates, NACKs.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use ott_apps::counters::Counters;
use ott_apps::datacmd::DataCmd;
use ott_apps::dataplane::spawn_forwarder;
use ott_proto::{flags, MediaHeader, Message, NackRange};

fn datagram(seq: u32) -> Vec<u8> {
    let h = MediaHeader {
        flags: flags::KEYFRAME,
        stream: 42,
        seq,
        frame: seq,
        frag_index: 0,
        frag_count: 1,
        timestamp: seq * 3600,
    };
    let mut d = h.to_bytes().to_vec();
    d.extend_from_slice(&seq.to_be_bytes());
    d
}

fn recv_seqs(sock: &UdpSocket, n: usize) -> Vec<(u32, bool)> {
    let mut buf = [0u8; 2048];
    let mut out = Vec::new();
    while out.len() < n {
        let Ok((len, _)) = sock.recv_from(&mut buf) else {
            break;
        };
        let h = MediaHeader::parse(&buf[..len]).expect("media from the forwarder");
        out.push((h.seq, h.has(flags::RETRANSMIT)));
    }
    out
}

struct Setup {
    relay: SocketAddr,
    cmds: crossbeam_channel::Sender<DataCmd>,
    children: Vec<UdpSocket>,
    upstream: UdpSocket,
}

fn setup(n_children: usize) -> Setup {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let relay = sock.local_addr().expect("addr");
    let (cmds, rx) = crossbeam_channel::unbounded();
    spawn_forwarder(sock, Arc::new(Counters::default()), rx).expect("thread");
    let children: Vec<UdpSocket> = (0..n_children)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            s
        })
        .collect();
    let addrs = children
        .iter()
        .map(|c| c.local_addr().expect("addr"))
        .collect();
    cmds.send(DataCmd::Route {
        stream: 42,
        name: "test".into(),
        children: addrs,
        sessions: Vec::new(),
    })
    .expect("route");
    // Commands are applied in order: once the snapshot answers, the route is in place.
    let snap = ott_apps::datacmd::snapshot(&cmds);
    assert_eq!(snap.get(&42).map(|t| t.children), Some(n_children));
    let upstream = UdpSocket::bind("127.0.0.1:0").expect("bind");
    upstream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    Setup {
        relay,
        cmds,
        children,
        upstream,
    }
}

#[test]
fn each_datagram_reaches_each_child_once_in_order() {
    let s = setup(5);
    for seq in 0..200u32 {
        s.upstream.send_to(&datagram(seq), s.relay).expect("send");
        if seq % 10 == 0 {
            // A duplicate, as during a make-before-break parent change.
            s.upstream.send_to(&datagram(seq), s.relay).expect("send");
        }
    }
    for c in &s.children {
        let got = recv_seqs(c, 200);
        let seqs: Vec<u32> = got.iter().map(|g| g.0).collect();
        assert_eq!(seqs, (0..200).collect::<Vec<_>>());
    }
    let _ = s.cmds.send(DataCmd::Stop);
}

#[test]
fn a_child_nack_is_answered_with_a_flagged_retransmission_and_a_stranger_is_ignored() {
    let s = setup(1);
    for seq in 0..10u32 {
        s.upstream.send_to(&datagram(seq), s.relay).expect("send");
    }
    let child = &s.children[0];
    assert_eq!(recv_seqs(child, 10).len(), 10);
    let nack = ott_proto::encode(&Message::Nack {
        stream: 42,
        data_port: 0,
        ranges: vec![NackRange { first: 3, count: 2 }],
    })
    .expect("encode");
    // A stranger asks first: nothing must come back to it.
    let stranger = UdpSocket::bind("127.0.0.1:0").expect("bind");
    stranger
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    stranger.send_to(&nack, s.relay).expect("send");
    child.send_to(&nack, s.relay).expect("send");
    assert_eq!(recv_seqs(child, 2), vec![(3, true), (4, true)]);
    let mut buf = [0u8; 2048];
    assert!(
        stranger.recv_from(&mut buf).is_err(),
        "no reflection to non-children"
    );
    let _ = s.cmds.send(DataCmd::Stop);
}

#[test]
fn a_gap_from_upstream_is_nacked() {
    let s = setup(1);
    for seq in (0..20u32).filter(|s| *s != 7) {
        s.upstream.send_to(&datagram(seq), s.relay).expect("send");
    }
    let mut buf = [0u8; 2048];
    let (len, _) = s
        .upstream
        .recv_from(&mut buf)
        .expect("a NACK comes back upstream");
    match ott_proto::decode(&buf[..len]).expect("a control message") {
        Message::Nack { stream, ranges, .. } => {
            assert_eq!(stream, 42);
            assert_eq!(ranges, vec![NackRange { first: 7, count: 1 }]);
        }
        other => panic!("expected a NACK, got {other:?}"),
    }
    let _ = s.cmds.send(DataCmd::Stop);
}

#[test]
fn a_viewer_gets_session_tagged_media_and_an_unrouted_stream_costs_nothing() {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let relay = sock.local_addr().expect("addr");
    let counters = Arc::new(Counters::default());
    let (cmds, rx) = crossbeam_channel::unbounded();
    spawn_forwarder(sock, counters.clone(), rx).expect("thread");
    let viewer = UdpSocket::bind("127.0.0.1:0").expect("bind");
    viewer
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let upstream = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let key = ott_proto::auth::SessionKey::from_bytes([7; 32]);
    let v = viewer.local_addr().expect("addr");
    cmds.send(DataCmd::Route {
        stream: 42,
        name: "test".into(),
        children: vec![v],
        sessions: vec![(v, key.clone())],
    })
    .expect("route");
    assert!(ott_apps::datacmd::snapshot(&cmds).contains_key(&42));
    // A stream nobody routed: counted, and no state appears for it.
    let mut other = datagram(1);
    other[4..8].copy_from_slice(&7u32.to_be_bytes());
    for _ in 0..10 {
        upstream.send_to(&other, relay).expect("send");
    }
    for seq in 0..5u32 {
        upstream.send_to(&datagram(seq), relay).expect("send");
    }
    let mut buf = [0u8; 2048];
    for seq in 0..5u32 {
        let (len, _) = viewer.recv_from(&mut buf).expect("media");
        let body = key.open(&buf[..len]).expect("the session tag verifies");
        assert_eq!(body, &datagram(seq)[..]);
    }
    let snap = ott_apps::datacmd::snapshot(&cmds);
    assert_eq!(snap.keys().copied().collect::<Vec<_>>(), vec![42]);
    assert_eq!(counters.snapshot().unrouted, 10);
    // The route goes, and the stream's state with it.
    cmds.send(DataCmd::Route {
        stream: 42,
        name: "test".into(),
        children: Vec::new(),
        sessions: Vec::new(),
    })
    .expect("route");
    assert!(ott_apps::datacmd::snapshot(&cmds).is_empty());
    upstream.send_to(&datagram(9), relay).expect("send");
    let _ = ott_apps::datacmd::snapshot(&cmds);
    assert!(wait_counter(&counters, 11));
    let _ = cmds.send(DataCmd::Stop);
}

/// Whether `unrouted` reaches `n` within 2 s.
fn wait_counter(c: &Counters, n: u64) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < end {
        if c.snapshot().unrouted >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}
