//! The forwarding thread with many children and more than one sender thread, on
//! loopback sockets: every datagram reaches every child once and in order (viewers'
//! copies sealed with their own keys), across a change of children, the counters add
//! up, and the sender threads end with the forwarder.
//!
//! Alone in its test binary, so that the threads it counts are its own.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use ott_apps::counters::Counters;
use ott_apps::datacmd::DataCmd;
use ott_apps::dataplane::{fanout, spawn_forwarder_with, ForwarderConfig};
use ott_proto::auth::SessionKey;
use ott_proto::{flags, MediaHeader};
use ott_testkit::wait_for;

const STREAM: u32 = 42;

fn datagram(seq: u32) -> Vec<u8> {
    let h = MediaHeader {
        flags: flags::KEYFRAME,
        stream: STREAM,
        seq,
        frame: seq,
        frag_index: 0,
        frag_count: 1,
        timestamp: seq * 3600,
    };
    let mut d = h.to_bytes().to_vec();
    d.extend_from_slice(&seq.to_be_bytes());
    // Full-size datagrams, so that GSO runs form as in real traffic.
    d.resize(1340, 0x47);
    d
}

/// The names of this process's threads that start with `prefix`.
fn threads_named(prefix: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

struct Child {
    sock: UdpSocket,
    key: Option<SessionKey>,
}

impl Child {
    fn new(i: u8) -> Self {
        let sock = ott_apps::net::bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // Every third child is a viewer: its copies are sealed with its session key.
        let key = i.is_multiple_of(3).then(|| SessionKey::from_bytes([i; 32]));
        Self { sock, key }
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("addr")
    }

    /// Read `seqs` in this order, each once, intact; a new child first gets the start
    /// cache replayed (flagged as cached) and the recent past the cache lacks (flagged
    /// as resent), which are counted and skipped.
    fn expect(&self, seqs: std::ops::Range<u32>, new: bool) -> u64 {
        let mut buf = [0u8; 2048];
        let seqs_start = seqs.start;
        let mut seqs = seqs.peekable();
        let mut replays = 0;
        let mut past: Option<u32> = None;
        while let Some(&seq) = seqs.peek() {
            let (len, _) = self
                .sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("{}: datagram {seq} missing: {e}", self.addr()));
            let body = match &self.key {
                Some(k) => k.open(&buf[..len]).expect("the session tag verifies"),
                None => &buf[..len],
            };
            let h = MediaHeader::parse(body).expect("media");
            if new && h.has(flags::CACHED) && replays < 4 {
                replays += 1;
                continue;
            }
            // Then the recent past the cache lacks, resent, oldest first.
            if new && h.has(flags::RETRANSMIT) {
                assert!(
                    h.seq < seqs_start,
                    "{}: only the past is resent",
                    self.addr()
                );
                assert!(
                    past.is_none_or(|p| p < h.seq),
                    "{}: the past out of order",
                    self.addr()
                );
                past = Some(h.seq);
                replays += 1;
                continue;
            }
            assert_eq!(h.seq, seq, "{}: out of order", self.addr());
            assert!(
                body == &datagram(seq)[..],
                "{}: datagram {seq} changed",
                self.addr()
            );
            seqs.next();
        }
        replays
    }
}

fn route(cmds: &crossbeam_channel::Sender<DataCmd>, children: &[Child]) {
    cmds.send(DataCmd::Route {
        stream: STREAM,
        name: "test".into(),
        children: children.iter().map(Child::addr).collect(),
        sessions: children
            .iter()
            .filter_map(|c| c.key.clone().map(|k| (c.addr(), k)))
            .collect(),
    })
    .expect("route");
    // Commands are applied in order: once the snapshot answers, the route is in place.
    let snap = ott_apps::datacmd::snapshot(cmds);
    assert_eq!(snap.get(&STREAM).map(|t| t.children), Some(children.len()));
}

#[test]
fn many_children_over_two_sender_threads_get_every_datagram_in_order() {
    let config = ForwarderConfig {
        fanout_threads: 2,
        fanout_min_children: 8,
        // Every round splits, single datagrams too (by default only rounds of 64 sends).
        fanout_min_sends: 1,
        ..ForwarderConfig::default()
    };
    let threads = config.effective_fanout_threads();
    let sock = ott_apps::net::bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let relay = sock.local_addr().expect("addr");
    let counters = Arc::new(Counters::default());
    let (cmds, rx) = crossbeam_channel::unbounded();
    let fwd = spawn_forwarder_with(config, sock, counters.clone(), rx).expect("thread");
    let upstream = UdpSocket::bind("127.0.0.1:0").expect("bind");

    let mut children: Vec<Child> = (0..12).map(Child::new).collect();
    if threads > 1 {
        // The 12 children are not all on one thread. Their ports are the kernel's
        // choice: while a thread has none, the first child on the busiest thread gets
        // a new port (odds of a miss are at most 1 in 2 each time).
        let per = |children: &[Child]| {
            let mut per = vec![0; threads];
            for c in children {
                per[fanout::sender_of(&c.addr(), threads)] += 1;
            }
            per
        };
        for _ in 0..1000 {
            let p = per(&children);
            if p.iter().all(|&n| n > 0) {
                break;
            }
            let busiest = (0..threads).max_by_key(|&t| p[t]).unwrap_or(0);
            if let Some(i) = children
                .iter()
                .position(|c| fanout::sender_of(&c.addr(), threads) == busiest)
            {
                children[i] = Child::new(i as u8);
            }
        }
        let p = per(&children);
        assert!(p.iter().all(|&n| n > 0), "partition {p:?}");
    }
    route(&cmds, &children);
    // Rounds of every size: single datagrams and bursts the forwarder reads in batches.
    let mut next = 0u32;
    let mut send = |n: u32| {
        for seq in next..next + n {
            upstream.send_to(&datagram(seq), relay).expect("send");
        }
        next += n;
        next
    };
    let first = send(1);
    let end = send(300);
    for c in &children {
        assert_eq!(c.expect(0..first, false), 0);
        assert_eq!(c.expect(first..end, false), 0);
    }
    if threads > 1 {
        assert_eq!(threads_named("data-send-"), threads - 1, "helper threads");
    }

    // Four children go, four come: the others keep their thread and their order.
    let stay: Vec<Child> = children.drain(4..).collect();
    let fresh: Vec<Child> = (12..16).map(Child::new).collect();
    let kept = stay.len();
    let children: Vec<Child> = stay.into_iter().chain(fresh).collect();
    route(&cmds, &children);
    let from = end;
    let end2 = send(200);
    let mut replays = 0;
    for (i, c) in children.iter().enumerate() {
        replays += c.expect(from..end2, i >= kept);
    }
    let expected = u64::from(end) * 12 + u64::from(end2 - from) * 12 + replays;
    wait_for(Duration::from_secs(5), "every send is counted", || {
        counters.snapshot().packets_out >= expected
    })
    .expect("counters");
    let c = counters.snapshot();
    assert_eq!(c.packets_out, expected);
    assert_eq!(c.send_errors, 0);

    // Stopping the forwarder stops its sender threads.
    cmds.send(DataCmd::Stop).expect("stop");
    wait_for(Duration::from_secs(5), "the forwarder ends", || {
        fwd.is_finished()
    })
    .expect("forwarder");
    fwd.join().expect("no panic");
    wait_for(Duration::from_secs(5), "no sender thread is left", || {
        threads_named("data-send-") == 0
    })
    .expect("threads");
}
