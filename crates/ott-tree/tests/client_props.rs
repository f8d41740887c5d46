//! Property tests: any sequence of inputs, sensible or not, never panics the client and
//! keeps its outputs consistent.
// Tests may read the clock (an origin for fake time) and files (samples).
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ott_proto::{MediaKind, Message, StreamInfo};
use ott_tree::client::{Client, ClientConfig, ClientEvent};
use proptest::prelude::*;

const NAMES: [&str; 3] = ["news", "sport", "bars"];

#[derive(Debug, Clone)]
enum Op {
    /// Advance the clock by this many ms and fire the timers that are due.
    Wait(u16),
    /// PoP `pop` answers its latest outstanding probe.
    Answer { pop: usize, path: Option<u32> },
    /// A message from PoP `pop`, or from a stranger when `pop` is out of range.
    Send { pop: usize, msg: Message },
    /// The user selects a stream.
    Select(usize),
}

fn arb_msg() -> impl Strategy<Value = Message> {
    let streams = proptest::collection::vec(0..NAMES.len(), 0..4).prop_map(|ix| Message::Streams {
        streams: ix
            .into_iter()
            .map(|i| StreamInfo::new(NAMES[i], MediaKind::Mjpeg, 25_000))
            .collect(),
    });
    prop_oneof![
        streams,
        (
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(nonce, echo_us, path_latency_us)| Message::ProbeReply {
                nonce,
                echo_us,
                pop: "x".into(),
                path_latency_us,
                hops: 1,
                viewers: 0,
                path: Vec::new(),
            }),
        ".{0,20}".prop_map(|reason| Message::Error { reason }),
        Just(Message::ListStreams),
        (any::<u32>(), any::<u16>())
            .prop_map(|(stream, data_port)| Message::Leave { stream, data_port }),
        any::<u64>().prop_map(|nonce| Message::Probe { nonce, sent_us: 0 }),
    ]
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u16..1500).prop_map(Op::Wait),
        3 => (0usize..3, proptest::option::of(0u32..100_000))
            .prop_map(|(pop, path)| Op::Answer { pop, path }),
        2 => (0usize..4, arb_msg()).prop_map(|(pop, msg)| Op::Send { pop, msg }),
        1 => (0..NAMES.len()).prop_map(Op::Select),
    ]
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 2, 1 + i as u8], 7000))
}

proptest! {
    #[test]
    fn prop_any_inputs_keep_the_client_consistent(ops in proptest::collection::vec(arb_op(), 0..80)) {
        let epoch = Instant::now();
        let mut now = epoch;
        let pops: Vec<(String, SocketAddr)> = (0..3).map(|i| (format!("p{i}"), addr(i))).collect();
        let mut client = Client::new(ClientConfig::default(), pops.clone(), 9000, epoch, now);
        // Latest probe sent to each PoP.
        let mut last_probe: HashMap<SocketAddr, (u64, u64)> = HashMap::new();
        // Streams joined at each address and not left since.
        let mut joined: HashMap<SocketAddr, Vec<u32>> = HashMap::new();
        // Streams joined where the client no longer watches them, since when.
        let mut stale: HashMap<(SocketAddr, u32), Instant> = HashMap::new();
        let mut switches = 0u64;
        for op in ops {
            match op {
                Op::Wait(d) => {
                    let until = now + Duration::from_millis(u64::from(d));
                    while let Some(t) = client.poll_timeout().filter(|t| *t <= until) {
                        now = now.max(t);
                        client.handle_timeout(now);
                        let next = client.poll_timeout();
                        prop_assert!(!matches!(next, Some(n) if n <= now), "timer due again at once");
                        drain(&mut client, now, &mut last_probe, &mut joined, &mut stale, &mut switches)?;
                    }
                    now = until;
                }
                Op::Answer { pop, path } => {
                    if let Some((nonce, sent_us)) = last_probe.get(&addr(pop)).copied() {
                        client.handle(now, addr(pop), Message::ProbeReply {
                            nonce,
                            echo_us: sent_us,
                            pop: format!("p{pop}"),
                            path_latency_us: path.map(u64::from),
                            hops: 1,
                            viewers: 0,
                            path: Vec::new(),
                        });
                    }
                }
                Op::Send { pop, msg } => client.handle(now, addr(pop), msg),
                Op::Select(i) => client.select_stream(now, NAMES[i]),
            }
            drain(&mut client, now, &mut last_probe, &mut joined, &mut stale, &mut switches)?;
            prop_assert_eq!(client.pop_switches(), switches);
            if let Some(p) = client.pop() {
                prop_assert!(pops.iter().any(|(id, _)| id == p));
            }
            let status = client.status();
            prop_assert_eq!(status.pops.len(), 3);
            for p in &status.pops {
                prop_assert!((0.0..=1.0).contains(&p.loss));
                prop_assert_eq!(p.usable, p.score.is_some());
            }
        }
        client.shutdown(now);
        drain(&mut client, now, &mut last_probe, &mut joined, &mut stale, &mut switches)?;
        prop_assert_eq!(client.poll_timeout(), None);
        // After shutdown the client is subscribed nowhere it knows of except stale PoPs it
        // already left: every stream it joined at its last PoP was left.
        if let Some(p) = client.pop() {
            let a = pops.iter().find(|(id, _)| id == p).map(|(_, a)| *a);
            if let Some(a) = a {
                prop_assert!(joined.get(&a).into_iter().all(Vec::is_empty), "still joined at {:?}", joined.get(&a));
            }
        }
    }
}

fn drain(
    client: &mut Client,
    now: Instant,
    last_probe: &mut HashMap<SocketAddr, (u64, u64)>,
    joined: &mut HashMap<SocketAddr, Vec<u32>>,
    stale: &mut HashMap<(SocketAddr, u32), Instant>,
    switches: &mut u64,
) -> Result<(), TestCaseError> {
    while let Some(t) = client.poll_transmit() {
        prop_assert!(ott_proto::encode(&t.msg).is_ok());
        match t.msg {
            Message::Probe { nonce, sent_us } => {
                last_probe.insert(t.to, (nonce, sent_us));
            }
            Message::Join { stream, .. } => {
                let v = joined.entry(t.to).or_default();
                if !v.contains(&stream) {
                    v.push(stream);
                }
            }
            Message::Leave { stream, .. } => {
                let v = joined.entry(t.to).or_default();
                prop_assert!(v.contains(&stream), "leave of a stream never joined there");
                v.retain(|s| *s != stream);
            }
            Message::ListStreams => {}
            other => prop_assert!(false, "client sent {other:?}"),
        }
    }
    while let Some(e) = client.poll_event() {
        if let ClientEvent::PopChanged { old: Some(_), .. } = e {
            *switches += 1;
        }
    }
    // A client watches at most one stream at one PoP; every other stream it joined
    // somewhere (the old PoP of a make-before-break move) is left at most `leave_after`
    // after the client stopped watching it there.
    let current = client
        .pop()
        .map(|p| addr(p[1..].parse().unwrap_or(usize::MAX)));
    let watching = client.stream().map(|s| s.id);
    let mut live = 0;
    for (a, streams) in joined.iter() {
        for s in streams {
            if Some(*a) == current && Some(*s) == watching {
                live += 1;
                stale.remove(&(*a, *s));
            } else {
                let since = *stale.entry((*a, *s)).or_insert(now);
                let grace = ClientConfig::default().leave_after;
                prop_assert!(
                    now.saturating_duration_since(since) <= grace,
                    "{s} still joined at {a} after {:?}",
                    now - since
                );
            }
        }
    }
    stale.retain(|(a, s), _| joined.get(a).is_some_and(|v| v.contains(s)));
    prop_assert!(live <= 1, "joined {live} streams at once: {joined:?}");
    Ok(())
}
