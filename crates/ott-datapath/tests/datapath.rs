//! The data-plane core on a fake clock.
// Tests may read the clock (an origin for fake time) and files (samples).
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ott_datapath::{
    Child, ChildKind, Config, DataPath, DataPathEvent as Event, Drop, MediaIn, Payload,
};
use ott_proto::auth::{OverlayKey, SessionKey};
use ott_proto::{flags, MediaHeader, NackRange, HEADER_LEN};

const S: u32 = 42;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn media(stream: u32, seq: u32, frame: u32, key: bool, len: usize) -> Vec<u8> {
    let h = MediaHeader {
        flags: if key { flags::KEYFRAME } else { 0 },
        stream,
        seq,
        frame,
        frag_index: 0,
        frag_count: 1,
        timestamp: 0,
    };
    let mut d = h.to_bytes().to_vec();
    d.resize(HEADER_LEN + len, 0xaa);
    d
}

/// Every queued transmit, as (to, bytes) with `Input` resolved against `inputs`.
fn sent(dp: &mut DataPath, inputs: &[Vec<u8>]) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(t) = dp.poll_transmit() {
        let bytes = match t.payload {
            Payload::Input { token, len } => inputs[token][..len].to_vec(),
            Payload::Bytes(b) => b.to_vec(),
            Payload::Nack { stream, ranges } => format!("nack {stream} {ranges:?}").into_bytes(),
        };
        out.push((t.to, bytes));
    }
    out
}

fn routed(children: &[u16]) -> (DataPath, Instant) {
    let t0 = Instant::now();
    let mut dp = DataPath::new(Config::default(), None);
    assert!(dp.set_route(
        t0,
        S,
        children.iter().map(|p| Child::member(addr(*p))).collect()
    ));
    (dp, t0)
}

#[test]
fn test_forwards_to_every_child_without_copy() {
    let (mut dp, t0) = routed(&[2001, 2002]);
    let d = media(S, 1, 1, true, 100);
    assert!(dp.handle_media(t0, Some(addr(1000)), &d, 0).is_ok());
    let out: Vec<_> = dp.drain_transmits().collect();
    assert_eq!(out.len(), 2);
    for t in &out {
        assert!(matches!(t.payload, Payload::Input { token: 0, len } if len == d.len()));
    }
    assert_eq!(
        dp.poll_event(),
        Some(Event::Upstream {
            stream: S,
            from: addr(1000)
        })
    );
    let st = dp.stream(S).expect("stream state");
    assert_eq!((st.datagrams_in, st.datagrams_out, st.frames_in), (1, 2, 1));
}

#[test]
fn test_duplicates_are_dropped() {
    let (mut dp, t0) = routed(&[2001]);
    let d = media(S, 5, 1, true, 10);
    assert!(dp.handle_media(t0, Some(addr(1000)), &d, 0).is_ok());
    assert_eq!(
        dp.handle_media(t0, Some(addr(1001)), &d, 1),
        Err(Drop::Duplicate)
    );
    assert_eq!(sent(&mut dp, &[d.clone(), d]).len(), 1);
    assert_eq!(dp.counters().duplicates, 1);
    assert_eq!(dp.stream(S).map(|s| s.duplicates), Some(1));
}

#[test]
fn test_source_lock_then_switch_after_silence() {
    let (mut dp, t0) = routed(&[2001]);
    assert!(dp
        .handle_media(t0, Some(addr(1000)), &media(S, 100, 1, true, 10), 0)
        .is_ok());
    // Another source's numbers while the first flows: dropped.
    let other = media(S, 3_000_000_000, 9, true, 10);
    let t = t0 + Duration::from_millis(50);
    assert_eq!(
        dp.handle_media(t, Some(addr(1001)), &other, 0),
        Err(Drop::OtherSource)
    );
    assert_eq!(dp.counters().other_source, 1);
    // After silence it takes over, and the caller hears of it.
    let t = t0 + Duration::from_millis(400);
    assert!(dp.handle_media(t, Some(addr(1001)), &other, 0).is_ok());
    let events: Vec<_> = std::iter::from_fn(|| dp.poll_event()).collect();
    assert!(events.contains(&Event::SourceSwitched { stream: S }));
    assert_eq!(dp.upstream(S), Some(addr(1001)));
    assert_eq!(dp.counters().source_switches, 1);
}

#[test]
fn test_nack_is_answered_within_the_budget() {
    let t0 = Instant::now();
    let config = Config {
        resend_burst_bytes: 3 * (HEADER_LEN as u64 + 1000),
        resend_bytes_per_sec: 1000,
        ..Config::default()
    };
    let mut dp = DataPath::new(config, None);
    dp.set_route(t0, S, vec![Child::member(addr(2001))]);
    for seq in 0..10 {
        let _ = dp.handle_media(t0, Some(addr(1000)), &media(S, seq, seq, false, 1000), 0);
    }
    let _ = sent(&mut dp, &[media(S, 0, 0, false, 1000)]);
    dp.handle_nack(t0, addr(2001), S, &[NackRange { first: 2, count: 5 }]);
    let resent = sent(&mut dp, &[]);
    assert_eq!(resent.len(), 3, "the burst allows three datagrams");
    let h = MediaHeader::parse(&resent[0].1).expect("media");
    assert!(h.has(flags::RETRANSMIT));
    assert_eq!(h.seq, 2);
    assert_eq!(dp.counters().resend_budget, 1);
    assert_eq!(dp.counters().nacks_answered, 1);
    assert_eq!(dp.stream(S).map(|s| s.retransmitted), Some(3));
}

#[test]
fn test_nack_from_a_non_child_is_ignored() {
    let (mut dp, t0) = routed(&[2001]);
    let _ = dp.handle_media(t0, Some(addr(1000)), &media(S, 1, 1, true, 10), 0);
    let _ = dp.drain_transmits();
    dp.handle_nack(t0, addr(6666), S, &[NackRange { first: 1, count: 1 }]);
    dp.handle_nack(t0, addr(2001), 999, &[NackRange { first: 1, count: 1 }]);
    assert!(dp.poll_transmit().is_none());
    assert_eq!(dp.counters().nacks_refused, 2);
    assert_eq!(dp.counters().retransmitted, 0);
}

#[test]
fn test_gap_is_nacked_upstream() {
    let (mut dp, t0) = routed(&[2001]);
    let _ = dp.handle_media(t0, Some(addr(1000)), &media(S, 1, 1, true, 10), 0);
    let _ = dp.handle_media(t0, Some(addr(1000)), &media(S, 4, 4, false, 10), 0);
    let _ = dp.drain_transmits();
    let due = dp.poll_timeout().expect("a NACK is scheduled");
    dp.handle_timeout(due);
    let t = dp.poll_transmit().expect("a NACK");
    assert_eq!(t.to, addr(1000));
    match t.payload {
        Payload::Nack { stream, ranges } => {
            assert_eq!(stream, S);
            assert_eq!(ranges[0].first, 2);
            assert_eq!(ranges[0].count, 2);
        }
        other => panic!("not a NACK: {other:?}"),
    }
    assert!(dp.poll_transmit().is_none(), "a first NACK goes once");
    assert_eq!(dp.counters().nacks_sent, 1);
    // Unanswered for a retry interval: asked again, twice, for the same numbers.
    let again = dp.poll_timeout().expect("a retry is scheduled");
    assert!(again > due);
    dp.handle_timeout(again);
    let retries: Vec<Vec<(u32, u16)>> = std::iter::from_fn(|| dp.poll_transmit())
        .map(|t| match t.payload {
            Payload::Nack { ranges, .. } => ranges.iter().map(|r| (r.first, r.count)).collect(),
            other => panic!("not a NACK: {other:?}"),
        })
        .collect();
    assert_eq!(retries, vec![vec![(2, 2)], vec![(2, 2)]]);
    assert_eq!(dp.counters().nacks_sent, 3);
}

/// A datagram flagged `flag` (cached or resent).
fn flagged(seq: u32, flag: u8) -> Vec<u8> {
    let mut d = media(S, seq, seq, false, 10);
    let mut h = MediaHeader::parse(&d).expect("a header we made");
    h.flags |= flag;
    d[..HEADER_LEN].copy_from_slice(&h.to_bytes());
    d
}

#[test]
fn test_gaps_in_a_first_burst_of_cached_data_are_nacked_to_its_sender() {
    let (mut dp, t0) = routed(&[2001]);
    // A new parent's start cache: seq 10, then 13 (11 and 12 lost), before any live data.
    let _ = dp.handle_media(t0, Some(addr(1000)), &flagged(10, flags::CACHED), 0);
    let _ = dp.handle_media(t0, Some(addr(1000)), &flagged(13, flags::RETRANSMIT), 0);
    assert_eq!(dp.upstream(S), Some(addr(1000)));
    // Another sender's cached datagram does not take the binding.
    let _ = dp.handle_media(t0, Some(addr(1001)), &flagged(14, flags::CACHED), 0);
    assert_eq!(dp.upstream(S), Some(addr(1000)));
    let _ = dp.drain_transmits();
    let due = dp.poll_timeout().expect("a NACK is scheduled");
    dp.handle_timeout(due);
    let nacks: Vec<_> = std::iter::from_fn(|| dp.poll_transmit())
        .filter_map(|t| match t.payload {
            Payload::Nack { ranges, .. } => Some((t.to, ranges[0].first, ranges[0].count)),
            _ => None,
        })
        .collect();
    assert_eq!(nacks, vec![(addr(1000), 11, 2)]);
    // Live data names the upstream, whoever sent the first burst.
    let _ = dp.handle_media(t0, Some(addr(1001)), &media(S, 15, 15, false, 10), 0);
    assert_eq!(dp.upstream(S), Some(addr(1001)));
}

#[test]
fn test_start_cache_serves_a_new_child_from_the_last_keyframe() {
    let (mut dp, t0) = routed(&[2001]);
    for f in 1..=7u32 {
        let _ = dp.handle_media(t0, Some(addr(1000)), &media(S, f, f, f % 3 == 1, 50), 0);
    }
    let _ = dp.drain_transmits();
    // Keyframes at 1, 4, 7: the new child gets frame 7 on (joining after the latency
    // budget, it gets no recent past besides).
    assert_eq!(dp.cached(S), 1);
    dp.set_route(
        t0 + Duration::from_millis(500),
        S,
        vec![Child::member(addr(2001)), Child::member(addr(2002))],
    );
    let out = sent(&mut dp, &[]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, addr(2002), "only the new child gets the replay");
    let h = MediaHeader::parse(&out[0].1).expect("media");
    assert!(h.has(flags::CACHED) && h.has(flags::KEYFRAME));
    assert_eq!(h.frame, 7);
}

#[test]
fn test_a_new_child_gets_the_recent_past_the_cache_lacks() {
    let (mut dp, t0) = routed(&[2001]);
    let ms = Duration::from_millis;
    // One datagram every 50 ms; keyframes at 1 and 8; seq 6 never came.
    for i in 0..10u32 {
        let seq = i + 1;
        if seq == 6 {
            continue;
        }
        let d = media(S, seq, seq, seq == 1 || seq == 8, 50);
        let _ = dp.handle_media(t0 + ms(50 * u64::from(i)), Some(addr(1000)), &d, 0);
    }
    let _ = dp.drain_transmits();
    // At 500 ms the budget (300 ms) reaches back to what came at 200 ms: seq 5 on.
    let now = t0 + ms(500);
    let viewer = SessionKey::from_bytes([7; 32]);
    dp.set_route(
        now,
        S,
        vec![
            Child::member(addr(2001)),
            Child::member(addr(2002)),
            Child {
                addr: addr(2003),
                kind: ChildKind::Session(viewer.clone()),
            },
        ],
    );
    let out = sent(&mut dp, &[]);
    let to = |port: u16| -> Vec<(u32, bool, bool)> {
        out.iter()
            .filter(|(a, _)| *a == addr(port))
            .map(|(_, d)| {
                let d = if port == 2003 {
                    viewer.open(d).expect("sealed for the viewer").to_vec()
                } else {
                    d.clone()
                };
                let h = MediaHeader::parse(&d).expect("media");
                (h.seq, h.has(flags::CACHED), h.has(flags::RETRANSMIT))
            })
            .collect()
    };
    assert!(to(2001).is_empty(), "a child kept gets nothing again");
    // The cache (8 on) first, then the recent past it lacks, oldest first, without
    // the number never received.
    let expected = vec![
        (8, true, false),
        (9, true, false),
        (10, true, false),
        (5, false, true),
        (7, false, true),
    ];
    assert_eq!(to(2002), expected);
    assert_eq!(to(2003), expected, "a viewer gets the same, sealed");
    assert_eq!(dp.counters().caught_up, 4);
    // The same route again: nothing.
    dp.set_route(
        now,
        S,
        vec![Child::member(addr(2001)), Child::member(addr(2002))],
    );
    assert!(sent(&mut dp, &[]).is_empty());
}

#[test]
fn test_stream_cap_refuses_routes_and_counts() {
    let t0 = Instant::now();
    let config = Config {
        max_streams: 2,
        max_children: 1,
        ..Config::default()
    };
    let mut dp = DataPath::new(config, None);
    assert!(dp.set_route(t0, 1, vec![Child::member(addr(1))]));
    assert!(dp.set_route(t0, 2, vec![Child::member(addr(1)), Child::member(addr(2))]));
    assert!(!dp.set_route(t0, 3, vec![Child::member(addr(1))]));
    assert_eq!(dp.counters().stream_cap, 1);
    assert_eq!(dp.counters().child_cap, 1);
    assert_eq!(dp.stream(2).map(|s| s.children), Some(1));
    // An existing stream may still change its route.
    assert!(dp.set_route(t0, 2, vec![Child::member(addr(3))]));
    assert_eq!(dp.streams().count(), 2);
}

#[test]
fn test_tag_failure_is_counted_and_dropped_before_decode() {
    let t0 = Instant::now();
    let key = OverlayKey::from_bytes(&[7; 32]).expect("key");
    let mut dp = DataPath::new(Config::default(), Some(key.clone()));
    let session = SessionKey::from_bytes([9; 32]);
    dp.set_route(
        t0,
        S,
        vec![
            Child::member(addr(2001)),
            Child {
                addr: addr(2002),
                kind: ChildKind::Strip,
            },
            Child {
                addr: addr(2003),
                kind: ChildKind::Session(session.clone()),
            },
        ],
    );
    // Untagged media, and garbage that would not even parse: both are auth failures.
    assert_eq!(
        dp.handle_media(t0, None, &media(S, 1, 1, true, 10), 0),
        Err(Drop::Auth)
    );
    assert_eq!(dp.handle_media(t0, None, &[0u8; 3], 0), Err(Drop::Auth));
    assert_eq!(dp.counters().auth_failed, 2);
    assert_eq!(dp.counters().malformed, 0);
    assert!(dp.stream(S).is_some_and(|s| s.datagrams_in == 0));
    // A tagged one goes to each child as it should.
    let mut d = media(S, 1, 1, true, 10);
    let plain = d.clone();
    key.seal_media(&mut d);
    assert!(dp.handle_media(t0, Some(addr(1000)), &d, 0).is_ok());
    let out = sent(&mut dp, &[d.clone()]);
    assert_eq!(out.len(), 3);
    assert_eq!(out[0], (addr(2001), d.clone()));
    assert_eq!(out[1], (addr(2002), plain.clone()));
    assert_eq!(session.open(&out[2].1).expect("session tag"), &plain[..]);
}

#[test]
fn test_state_is_freed_with_the_route() {
    let (mut dp, t0) = routed(&[2001]);
    let _ = dp.handle_media(t0, Some(addr(1000)), &media(S, 1, 1, true, 10), 0);
    let _ = dp.drain_transmits();
    assert_eq!(dp.cached(S), 1);
    assert!(dp.set_route(t0, S, Vec::new()));
    assert_eq!(dp.streams().count(), 0);
    assert_eq!(dp.cached(S), 0);
    assert_eq!(
        dp.handle_media(t0, Some(addr(1000)), &media(S, 2, 2, false, 10), 0),
        Err(Drop::Unrouted)
    );
    dp.handle_nack(t0, addr(2001), S, &[NackRange { first: 1, count: 1 }]);
    assert!(dp.poll_transmit().is_none());
    assert_eq!(dp.counters().unrouted, 1);
}

#[test]
fn test_random_operations_never_panic() {
    let mut rng = fastrand::Rng::with_seed(9);
    for keyed in [false, true] {
        let key = keyed.then(|| OverlayKey::from_bytes(&[3; 32]).expect("key"));
        let config = Config {
            max_streams: 4,
            max_children: 3,
            retransmit_depth: 16,
            ..Config::default()
        };
        let mut dp = DataPath::new(config, key.clone());
        let mut now = Instant::now();
        for _ in 0..20_000 {
            now += Duration::from_millis(rng.u64(0..20));
            let stream = rng.u32(0..6);
            match rng.u8(0..6) {
                0 => {
                    let n = rng.usize(0..5);
                    let children = (0..n)
                        .map(|_| Child {
                            addr: addr(rng.u16(1..8)),
                            kind: match rng.u8(0..3) {
                                0 => ChildKind::Member,
                                1 => ChildKind::Strip,
                                _ => ChildKind::Session(SessionKey::from_bytes([1; 32])),
                            },
                        })
                        .collect();
                    dp.set_route(now, stream, children);
                }
                1 => {
                    let ranges: Vec<_> = (0..rng.usize(0..4))
                        .map(|_| NackRange {
                            first: rng.u32(0..64),
                            count: rng.u16(..),
                        })
                        .collect();
                    dp.handle_nack(now, addr(rng.u16(1..8)), stream, &ranges);
                }
                2 => {
                    let mut junk = vec![0u8; rng.usize(0..64)];
                    rng.fill(&mut junk);
                    let _ = dp.handle_media(now, Some(addr(rng.u16(1..8))), &junk, 0);
                }
                3 => dp.handle_timeout(now),
                _ => {
                    let seq = if rng.bool() {
                        rng.u32(0..64)
                    } else {
                        rng.u32(..)
                    };
                    let mut d = media(stream, seq, seq / 2, rng.u8(0..4) == 0, rng.usize(0..200));
                    if let Some(k) = &key {
                        k.seal_media(&mut d);
                    }
                    let _ = dp.handle_media(now, Some(addr(rng.u16(1..8))), &d, 0);
                }
            }
            assert!(dp.streams().count() <= 4);
            while let Some(t) = dp.poll_transmit() {
                if let Payload::Input { token, len } = t.payload {
                    assert_eq!(token, 0);
                    assert!(len <= 64 + HEADER_LEN + 200 + 16);
                }
            }
            while dp.poll_event().is_some() {}
        }
    }
}

#[test]
fn test_a_pinned_local_stream_caches_without_children_and_serves_the_first_child() {
    let t0 = Instant::now();
    let key = OverlayKey::from_bytes(&[5; 32]).expect("key");
    let mut dp = DataPath::new(Config::default(), Some(key.clone()));
    assert!(dp.pin_stream(S));
    let mut d = media(S, 10, 3, true, 40);
    key.seal_media(&mut d);
    let d = bytes::Bytes::from(d);
    assert!(dp.handle_local(t0, &d, 0).is_ok());
    assert!(dp.poll_transmit().is_none(), "nobody to send to yet");
    assert_eq!(dp.cached(S), 1);
    // The first child gets the cached start, tag included (a member).
    dp.set_route(t0, S, vec![Child::member(addr(2001))]);
    let out = sent(&mut dp, &[]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1.len(), d.len());
    // Its NACK is answered from the buffer; the route going leaves the pinned state.
    dp.handle_nack(
        t0,
        addr(2001),
        S,
        &[NackRange {
            first: 10,
            count: 1,
        }],
    );
    assert_eq!(sent(&mut dp, &[]).len(), 1);
    dp.set_route(t0, S, Vec::new());
    assert_eq!(dp.cached(S), 1);
    assert_eq!(dp.stream(S).map(|s| s.children), Some(0));
}

#[test]
fn test_a_viewer_accepts_only_media_sealed_with_its_session() {
    let t0 = Instant::now();
    let mut dp = DataPath::for_viewer(Config {
        retransmit_depth: 1,
        ..Config::default()
    });
    assert!(dp.pin_stream(S));
    let session = SessionKey::from_bytes([4; 32]);
    let plain = media(S, 1, 1, true, 20);
    let sealed = session.seal(&plain);
    // Before admission nothing is accepted, and a forged tag never is.
    assert_eq!(
        dp.handle_media(t0, Some(addr(1)), &sealed, 0),
        Err(Drop::Auth)
    );
    dp.add_session(session);
    let forged = SessionKey::from_bytes([5; 32]).seal(&plain);
    assert_eq!(
        dp.handle_media(t0, Some(addr(1)), &forged, 0),
        Err(Drop::Auth)
    );
    let ok = dp
        .handle_media(t0, Some(addr(1)), &sealed, 0)
        .expect("accepted");
    assert_eq!(ok.len, plain.len());
    assert_eq!(ok.header.seq, 1);
    assert_eq!(dp.counters().auth_failed, 2);
    // Another stream than the one watched is not taken.
    let other = SessionKey::from_bytes([4; 32]).seal(&media(S + 1, 1, 1, true, 20));
    assert_eq!(
        dp.handle_media(t0, Some(addr(1)), &other, 0),
        Err(Drop::Unrouted)
    );
    assert_eq!(dp.upstream(S), Some(addr(1)));
    dp.remove_stream(S);
    assert_eq!(dp.streams().count(), 0);
}

#[test]
fn test_children_per_address_are_capped() {
    let t0 = Instant::now();
    let config = Config {
        max_children_per_ip: 2,
        ..Config::default()
    };
    let mut dp = DataPath::new(config, None);
    let mut children: Vec<Child> = (1..=5).map(|p| Child::member(addr(p))).collect();
    children.push(Child::member(SocketAddr::from(([127, 0, 0, 2], 1))));
    assert!(dp.set_route(t0, S, children));
    assert_eq!(dp.stream(S).map(|s| s.children), Some(3));
    assert_eq!(dp.counters().child_cap, 3);
}

/// A node that took the stream late (its new child lost what passed while the child's
/// old parent was dying) passes a NACK for older datagrams upstream, and the
/// retransmissions reach the child as ordinary forwarding.
#[test]
fn test_nack_for_datagrams_before_our_first_is_passed_upstream() {
    let (mut dp, t0) = routed(&[2001]);
    let up = addr(1000);
    let first: Vec<Vec<u8>> = (100..104).map(|s| media(S, s, s, false, 50)).collect();
    for (i, d) in first.iter().enumerate() {
        assert!(dp.handle_media(t0, Some(up), d, i).is_ok());
    }
    let _ = sent(&mut dp, &first);
    // The child asks for 96..102: 100 and 101 are here, 96..100 never were.
    dp.handle_nack(
        t0,
        addr(2001),
        S,
        &[NackRange {
            first: 96,
            count: 6,
        }],
    );
    let out = sent(&mut dp, &[]);
    assert_eq!(out.len(), 2, "100 and 101 resent at once");
    assert_eq!(dp.counters().nacks_relayed, 1);
    assert_eq!(dp.stream(S).map(|s| s.nacks_relayed), Some(1));
    // After the reorder delay the node NACKs its own upstream for 96..100.
    let t = t0 + Duration::from_millis(10);
    assert!(dp.poll_timeout().is_some_and(|w| w <= t));
    dp.handle_timeout(t);
    let out = sent(&mut dp, &[]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, up);
    let nack = String::from_utf8_lossy(&out[0].1).into_owned();
    assert!(nack.contains("first: 96, count: 4"), "{nack}");
    // What comes back is forwarded to the child like any new datagram.
    let mut back = media(S, 97, 97, false, 50);
    let h = MediaHeader {
        flags: flags::RETRANSMIT,
        ..MediaHeader::parse(&back).expect("media")
    };
    back[0..HEADER_LEN].copy_from_slice(&h.to_bytes());
    assert!(dp.handle_media(t, Some(up), &back, 0).is_ok());
    let out = sent(&mut dp, std::slice::from_ref(&back));
    assert_eq!(out, vec![(addr(2001), back.clone())]);
    // A NACK for what this node received and still holds is not passed on.
    dp.handle_nack(
        t,
        addr(2001),
        S,
        &[NackRange {
            first: 102,
            count: 2,
        }],
    );
    assert_eq!(dp.counters().nacks_relayed, 1);
}

/// A keyed relay with members, strip children and viewers of two streams, fed the same
/// datagrams (full-size and short, bad tags, duplicates, another source, unrouted,
/// resent copies) one at a time and as batches: same drops, transmits, events, counters.
#[test]
fn test_a_batch_is_handled_as_its_datagrams_one_at_a_time() {
    let t0 = Instant::now();
    let key = OverlayKey::from_bytes(&[7; 32]).expect("key");
    let children = |base: u16| {
        vec![
            Child {
                addr: addr(base),
                kind: ChildKind::Session(SessionKey::from_bytes([base as u8; 32])),
            },
            Child::member(addr(base + 1)),
            Child {
                addr: addr(base + 2),
                kind: ChildKind::Strip,
            },
            Child {
                addr: addr(base + 3),
                kind: ChildKind::Session(SessionKey::from_bytes([base as u8 + 1; 32])),
            },
        ]
    };
    let mut inputs: Vec<Vec<u8>> = Vec::new();
    for seq in 1..200u32 {
        let stream = if seq % 3 == 0 { S + 1 } else { S };
        let len = if seq % 7 == 0 { 100 } else { 1316 };
        let mut d = media(stream, seq, seq / 4, seq % 20 == 1, len);
        if seq % 11 == 0 {
            d[3] |= flags::RETRANSMIT;
        }
        key.seal_media(&mut d);
        match seq % 13 {
            0 => {
                let n = d.len();
                d[n - 1] ^= 1; // a bad tag
            }
            5 => inputs.push(d.clone()), // a duplicate
            _ => {}
        }
        inputs.push(d);
        if seq % 17 == 0 {
            let mut other = media(S, seq + 5_000_000, 1, false, 1316); // another source
            key.seal_media(&mut other);
            inputs.push(other);
            let mut unrouted = media(S + 9, seq, 1, false, 50);
            key.seal_media(&mut unrouted);
            inputs.push(unrouted);
            inputs.push(vec![b'O', b'T', 1]); // too short
        }
    }
    let new = || {
        let mut dp = DataPath::new(Config::default(), Some(key.clone()));
        assert!(dp.set_route(t0, S, children(3000)));
        assert!(dp.set_route(t0, S + 1, children(4000)));
        dp
    };
    let from = Some(addr(1000));
    let mut one = new();
    let mut batched = new();
    for (b, chunk) in inputs.chunks(37).enumerate() {
        let now = t0 + Duration::from_millis(b as u64);
        let base = b * 37;
        let mut want_drops = Vec::new();
        for (i, d) in chunk.iter().enumerate() {
            if let Err(why) = one.handle_media(now, from, d, base + i) {
                want_drops.push((i, why));
            }
        }
        let batch: Vec<MediaIn<'_>> = chunk
            .iter()
            .enumerate()
            .map(|(i, d)| MediaIn {
                from,
                datagram: d,
                token: base + i,
            })
            .collect();
        let mut drops = Vec::new();
        batched.handle_media_batch(now, &batch, &mut drops);
        assert_eq!(drops, want_drops);
        assert_eq!(sent(&mut batched, &inputs), sent(&mut one, &inputs));
        while let Some(e) = one.poll_event() {
            assert_eq!(batched.poll_event(), Some(e));
        }
        assert_eq!(batched.poll_event(), None);
    }
    assert_eq!(batched.counters(), one.counters());
    assert!(one.counters().auth_failed > 0 && one.counters().duplicates > 0);
    assert!(one.counters().other_source > 0 && one.counters().unrouted > 0);
    assert_eq!(batched.stream(S), one.stream(S));
}
